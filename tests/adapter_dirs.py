"""What an adapter directory holds on disk, for tests that compare it before and after a write."""
import os
from pathlib import Path


def tree(directory) -> dict:
    """{path relative to `directory`: the bytes of a file, 'link -> target' of a symbolic link, or
    'dir' of a directory}, for every entry below `directory` (links are not followed)."""
    out = {}
    for root, dirs, files in os.walk(directory):  # followlinks=False: a link to a directory is listed, not entered
        for name in dirs + files:
            path = Path(root) / name
            key = str(path.relative_to(directory))
            if path.is_symlink():
                out[key] = f"link -> {os.readlink(path)}"
            else:
                out[key] = "dir" if path.is_dir() else path.read_bytes()
    return out
