"""The package, the README and CI agree, and importing touches neither CUDA nor triton."""
import re
import subprocess
import sys
from pathlib import Path

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
