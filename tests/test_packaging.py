"""The package, the README and CI agree, and importing touches neither CUDA nor triton."""
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def setup_commands():
    block = re.search(r"## Set up.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands_each_with_its_own_venv():
    commands = setup_commands()
    assert len(commands) == 2
    assert commands[0].startswith("python3 -m venv .venv-main ") and "-m cersa_kernels compare" in commands[0]
    assert commands[1].startswith("python3 -m venv .venv-test ") and "pytest tests" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci


def test_import_touches_no_cuda_and_no_triton():
    code = (
        "import sys, torch\n"
        "torch.cuda.is_available = lambda: (_ for _ in ()).throw(AssertionError('cuda probed at import'))\n"
        "torch.cuda.init = torch.cuda.is_available\n"
        "import cersa_kernels, cersa_kernels.ops, cersa_kernels.nn\n"
        "assert 'triton' not in sys.modules, 'triton imported at import time'\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def requirement_names(path: Path) -> list[str]:
    """The packages a requirements file asks for, following its `-r` includes (not `-c`)."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            names += requirement_names(path.parent / line[2:].strip())
        elif line and not line.startswith("-"):
            names.append(Requirement(line).name)
    return names


def test_every_installed_dependency_of_the_test_requirements_is_pinned():
    """CI installs requirements/test.txt under constraints.txt: a dependency missing from it (a new
    package's new dependencies, say) would float to whatever version the index has that day."""
    constraints = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    pinned = {canonicalize_name(line.split("==")[0]) for line in constraints if "==" in line and not line.startswith("#")}
    todo, seen = [canonicalize_name(n) for n in requirement_names(ROOT / "requirements" / "test.txt")], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.distribution(name).requires or []:  # installed: the suite needs it
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    assert not seen - pinned, f"needed by requirements/test.txt, not pinned in constraints.txt: {sorted(seen - pinned)}"
