"""A longer fuzz run than CI's: every command on mutated ONNX models and torch checkpoints.

    .venv/bin/python benchmarks/fuzz.py --examples 500 [--random]

Runs tests/stages/test_fuzz.py with BNFOLD_FUZZ_EXAMPLES per property (three properties: byte
mutations and field mutations of an ONNX model, each run through fuse, verify, bench and
calibrate; and mutations of a torch state_dict run through fuse) and prints how many cases ran.
--random draws new cases instead of hypothesis's derandomized ones.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS_PER_CASE = {"test_byte_mutations": 4, "test_field_mutations": 4, "test_torch_checkpoint_mutations": 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="cases per property")
    parser.add_argument("--random", action="store_true", help="new random cases (default: derandomized)")
    args = parser.parse_args()
    env = {**os.environ, "BNFOLD_FUZZ_EXAMPLES": str(args.examples)}
    if args.random:
        env["BNFOLD_FUZZ_SEED"] = "random"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                           "--hypothesis-show-statistics", "tests/stages/test_fuzz.py"], cwd=ROOT, env=env)
    runs = args.examples * sum(COMMANDS_PER_CASE.values())
    print(f"\n{args.examples} cases per property × {len(COMMANDS_PER_CASE)} properties; up to {runs} command runs "
          f"in {time.perf_counter() - start:.0f} s; exit {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
