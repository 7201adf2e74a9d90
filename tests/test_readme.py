"""The README's commands that use the bundled examples are run as written, so the docs cannot
rot: every line of a ```bash block that names examples/ runs in a copy of the repository's
examples with freshly made models, and must exit 0 (or the code its comment says: `# exit N`).

A block marked `<!-- recipe: NAME -->` ("Where your model comes from") runs whole, stopping at
the first failing line (bash -e): its lines before the first `bnfold` line (which fetch or make
the user's model) as written where examples/recipes.py says they can run here, else replaced by
that recipe's look-alike, which writes the same files; every line from the first `bnfold` on
runs as written.

A line that is one plain `bnfold` command (no shell syntax but quotes and a comment) runs in this
process, with the arguments bash would give it, through the function the console script calls
(each child process would pay seconds of `import torch`; the console script itself is tested in
tests/cli); every other line runs in bash."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


RECIPE = re.compile(r"<!-- recipe: (\w+) -->\s*```bash\n(.*?)```", flags=re.S)
sys.path.insert(0, str(ROOT / "examples"))
import make_examples  # noqa: E402
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
    argv = ["make_examples.py", "--out", str(work / "examples" / "models"), "--steps", "5"]
    with mock.patch.object(sys, "argv", argv):  # its command line, in this process: torch is imported already
        make_examples.main()
    return work


def test_the_readme_names_example_commands():
    assert len(readme_commands()) >= 4


def environment(workdir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("BNFOLD_DEBUG", None)
    if workdir is not None:  # the look-alikes' pickled classes live in examples/
        env["PYTHONPATH"] = os.pathsep.join([str(workdir / "examples"), env.get("PYTHONPATH", "")])
    return env


def plain_bnfold(line: str) -> list[str] | None:
    """The arguments bash gives `bnfold` for a line that is one plain bnfold command: words,
    paths, options and quoted strings, perhaps a comment after them; None for any other line
    (variables, globs, pipes, redirections, braces, several commands): bash runs those."""
    code = re.sub(r"\s+#[^'\"]*$", "", line.strip())  # a trailing comment with no quotes in it
    unquoted = re.sub(r"'[^']*'|\"[^\"$`\\!]*\"", "", code)
    if not code.startswith("bnfold ") or re.search(r"[^\w\s\-./:=,+@%]", unquoted):
        return None
    return shlex.split(code)[1:]


def test_plain_bnfold_splits_as_bash_does():
    assert plain_bnfold("bnfold fuse a.onnx -o b.onnx   # exit 2: would overwrite") == ["fuse", "a.onnx", "-o",
                                                                                        "b.onnx"]
    assert plain_bnfold("""bnfold fuse m.pth --arch-kwargs '{"model_name": "r50"}'""") == [
        "fuse", "m.pth", "--arch-kwargs", '{"model_name": "r50"}']
    assert plain_bnfold('bnfold fuse "logs/epoch=9-step=100.ckpt" --arch mynet:build') == [
        "fuse", "logs/epoch=9-step=100.ckpt", "--arch", "mynet:build"]
    for shell in ("bnfold fuse *.onnx", "bnfold fuse $MODEL", "bnfold fuse a.onnx > log", "bnfold fuse a | tee x",
                  "bnfold fuse a && ls", "bnfold fuse {a,b}.onnx", 'bnfold fuse "$HOME/a.onnx"', "python -c 'x'",
                  "bnfold fuse ~/a.onnx"):
        assert plain_bnfold(shell) is None, shell


def run_line(line: str, workdir: Path, bnfold_run, env: dict[str, str]) -> subprocess.CompletedProcess:
    args = plain_bnfold(line)
    if args is not None:
        return bnfold_run(args, cwd=workdir)
    return subprocess.run(["bash", "-c", line], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def test_readme_commands_in_order(workdir, bnfold_run):
    """In README order, in one test: later lines use what earlier ones wrote."""
    env = environment()
    for line in readme_commands():
        proc = run_line(line, workdir, bnfold_run, env)
        assert proc.returncode == expected_code(line), f"{line}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, line


def test_every_recipe_has_a_look_alike():
    assert sorted(readme_recipes()) == sorted(recipes.RECIPES)


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_recipe(workdir, name, bnfold_run):
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
    for chunk in chunks(lines):  # in order, each must succeed before the next runs
        if isinstance(chunk, list):
            proc = bnfold_run(chunk, cwd=workdir)
        else:
            proc = subprocess.run(["bash", "-c", "set -e\n" + chunk], cwd=workdir, env=environment(workdir),
                                  capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{chunk}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, chunk


def chunks(lines: list[str]) -> list[list[str] | str]:
    """A block's lines as what runs in turn: a plain bnfold line's arguments, or a script for
    bash of the lines between them (a heredoc's lines stay with the line that opens it)."""
    out: list[list[str] | str] = []
    script: list[str] = []
    heredoc = None
    for line in lines:
        args = plain_bnfold(line) if heredoc is None else None
        if args is not None:
            if script:
                out.append("\n".join(script))
                script = []
            out.append(args)
            continue
        script.append(line)
        if heredoc is None:
            opened = re.search(r"<<-?\s*['\"]?(\w+)", line)
            heredoc = opened.group(1) if opened else None
        elif line.strip() == heredoc:
            heredoc = None
    if script:
        out.append("\n".join(script))
    return out
