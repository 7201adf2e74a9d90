"""A longer fuzz run than CI's: every command on mutated models, checkpoints, archives and options.

    .venv/bin/python benchmarks/fuzz.py --examples 500 [--random]

Runs tests/stages/test_fuzz.py with BNFOLD_FUZZ_EXAMPLES per property for byte and field
mutations of an ONNX model (each run through fuse, verify, bench and calibrate), absurd option
values and mutations of a torch state_dict; a sixth of it (a torch run costs more) for mutations
of safetensors headers, of TorchScript and torch.export archives (entries and JSON configs) and
for hostile --arch-kwargs, each run through fuse. Prints how many command runs that was at most
(hypothesis stops early where it has tried every distinct case). --random draws new cases
instead of hypothesis's derandomized ones.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# property → (command runs per case, share of --examples it runs)
COMMANDS_PER_CASE = {"test_byte_mutations": (4, 1), "test_field_mutations": (4, 1), "test_option_values": (1, 1),
                     "test_torch_checkpoint_mutations": (1, 1), "test_safetensors_header_mutations": (1, 1 / 6),
                     "test_torch_archive_mutations": (1, 1 / 6), "test_arch_kwargs_values": (1, 1 / 6)}


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
    runs = sum(int(max(4, args.examples * share)) * commands for commands, share in COMMANDS_PER_CASE.values())
    print(f"\n{args.examples} cases per property ({max(4, args.examples // 6)} for the torch archives, headers and "
          f"--arch-kwargs) × {len(COMMANDS_PER_CASE)} properties; up to {runs} command runs in "
          f"{time.perf_counter() - start:.0f} s; exit {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
