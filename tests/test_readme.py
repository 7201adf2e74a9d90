"""The README's commands that use the bundled examples are run as written, so the docs cannot
rot: every line of a ```bash block that names examples/ runs in a copy of the repository's
examples with freshly made models, and must exit 0 (or the code its comment says: `# exit N`)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("bnfold ") and "examples/" in line]


def expected_code(line: str) -> int:
    match = re.search(r"#\s*exit (\d+)", line)
    return int(match.group(1)) if match else 0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    # The models `make demo` makes, in a copy of examples/ (fewer training steps: same code path).
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "examples", work / "examples", ignore=shutil.ignore_patterns("models"))
    subprocess.run([sys.executable, "examples/make_examples.py", "--out", "examples/models", "--steps", "5"],
                   cwd=work, check=True, capture_output=True, timeout=600)
    return work


def test_the_readme_names_example_commands():
    assert len(readme_commands()) >= 4


def test_readme_commands_in_order(workdir):
    """In README order, in one test: later lines use what earlier ones wrote."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("BNFOLD_DEBUG", None)
    for line in readme_commands():
        proc = subprocess.run(["bash", "-c", line], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == expected_code(line), f"{line}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, line
