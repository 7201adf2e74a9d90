import os
import subprocess
import sys
from pathlib import Path

import pytest

# Test helper modules (onnx_builders, shared cases) live beside the tests, one folder per package.
HERE = os.path.dirname(__file__)
for folder in ("", "onnxfold", "torchfold", "check", "stages", "cli"):
    sys.path.insert(0, os.path.join(HERE, folder))


@pytest.fixture
def bnfold_run(capfd, monkeypatch):
    """`bnfold ARGS` in this process, through the function the console script calls; returns what
    subprocess.run would (returncode, stdout, stderr). Both the file descriptors and sys.stdout/err
    are captured: what is printed or written to fd 2 is seen. A logging handler made earlier in
    the session (torch makes its own at import) writes to the stream it was made with, unseen
    here. BNFOLD_DEBUG is unset unless `debug`. A child process costs seconds of `import torch`:
    tests that need one (what libraries log, signals, import-time behaviour, the console script
    itself, BNFOLD_DEBUG's traceback) run `bnfold` with subprocess instead."""
    from bnfold.cli import run as cli

    def run(args: list[str], cwd: Path | str | None = None, debug: bool = False) -> subprocess.CompletedProcess:
        capfd.readouterr()
        with monkeypatch.context() as patch:
            patch.delenv("BNFOLD_DEBUG", raising=False)
            if debug:
                patch.setenv("BNFOLD_DEBUG", "1")
            if cwd is not None:
                patch.chdir(cwd)
            code = cli([str(a) for a in args])
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["bnfold", *args], code, out, err)

    return run


@pytest.fixture(scope="session", autouse=True)
def _torch_threads_per_worker():
    """Under pytest -n N each worker takes 1/N of torch's default intra-op pool (one thread per
    core): N workers each running a pool as wide as the machine only contend for the same cores
    (on 2 cores with -n 2, the torch-heavy files took a third longer)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    yield
