"""The README's commands that use the bundled examples are run as written, so the docs cannot
rot: every line of a ```bash block that names examples/ runs in a copy of the repository's
examples with freshly made models, and must exit 0 (or the code its comment says: `# exit N`).

A block marked `<!-- recipe: NAME -->` ("Where your model comes from") runs whole, with bash -e:
its lines before the first `bnfold` line (which fetch or make the user's model) as written where
examples/recipes.py says they can run here, else replaced by that recipe's look-alike, which
writes the same files; every line from the first `bnfold` on runs as written."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


RECIPE = re.compile(r"<!-- recipe: (\w+) -->\s*```bash\n(.*?)```", flags=re.S)
sys.path.insert(0, str(ROOT / "examples"))
import recipes  # noqa: E402


def readme_recipes() -> dict[str, str]:
    return dict(RECIPE.findall((ROOT / "README.md").read_text()))


def readme_commands() -> list[str]:
    text = RECIPE.sub("", (ROOT / "README.md").read_text())  # recipe blocks run whole, below
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
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


def environment(workdir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("BNFOLD_DEBUG", None)
    if workdir is not None:  # the look-alikes' pickled classes live in examples/
        env["PYTHONPATH"] = os.pathsep.join([str(workdir / "examples"), env.get("PYTHONPATH", "")])
    return env


def test_readme_commands_in_order(workdir):
    """In README order, in one test: later lines use what earlier ones wrote."""
    env = environment()
    for line in readme_commands():
        proc = subprocess.run(["bash", "-c", line], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == expected_code(line), f"{line}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, line


def test_every_recipe_has_a_look_alike():
    assert sorted(readme_recipes()) == sorted(recipes.RECIPES)


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_recipe(workdir, name):
    """The recipe's block, whole: its own first lines where they can run here, else the look-alike's files."""
    recipe, block = recipes.RECIPES[name], readme_recipes()[name]
    missing = [m for m in recipe.needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (requirements-dev.txt installs it)")
    lines = block.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("bnfold "))
    as_written = recipe.module is not None and importlib.util.find_spec(recipe.module) is not None
    if not as_written:  # in this process, which has torch imported already
        recipes.write(name, workdir)
        lines = lines[first:]
    script = "\n".join(["set -e", *lines])
    proc = subprocess.run(["bash", "-c", script], cwd=workdir, env=environment(workdir), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{script}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
