"""Fold, then quantize: how far onnxruntime's static int8 quantization of a ResNet-18 lands from
the float model, quantizing the unfused export, bnfold's fold of it, and onnxruntime's own
recommended pre-processing (quant_pre_process, whose optimizer folds BN too).

    .venv/bin/python benchmarks/quantize_after_fold.py [--quick] [--out BENCHMARKS.md]

The ResNet-18 is examples/zoo.py's (torchvision's layer shapes, random weights, real BN
statistics from training-mode batches, random γ/β), exported with its BNs kept. Calibration and
evaluation inputs are different seeded N(0, 1) batches. Each int8 model is
`quantize_static(model, out, reader)` with the settings named in the table (QDQ, MinMax, uint8
activations, int8 weights), run in onnxruntime with its default optimizations as a deployment
would; errors are taken against the float model's logits in torch on the same inputs.
The markdown section goes between its markers in --out, with the command that made it.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
from sections import write_section  # noqa: E402


class Reader:
    """onnxruntime's CalibrationDataReader: one sample per call, then None."""

    def __init__(self, name: str, samples: np.ndarray):
        self.name, self.samples, self.i = name, samples, 0

    def get_next(self):
        if self.i == len(self.samples):
            return None
        self.i += 1
        return {self.name: self.samples[self.i - 1:self.i]}

    def rewind(self):
        self.i = 0


def build(folder: Path, size: int) -> tuple[Path, object]:
    import torch
    import zoo

    torch.manual_seed(0)
    model = zoo.resnet18()
    with torch.no_grad():
        zoo.fill_bn_stats(model, (3, size, size), steps=3, batch=8)
    return zoo.export_onnx(model, torch.randn(1, 3, size, size), folder / "resnet18.onnx"), model


def quantize(src: Path, dst: Path, calib: np.ndarray, per_channel: bool) -> Path:
    from onnxruntime.quantization import QuantFormat, quantize_static

    quantize_static(str(src), str(dst), Reader("input", calib), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel)
    return dst


def logits(path: Path, samples: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": samples[i:i + 8]})[0] for i in range(0, len(samples), 8)])


def errors(got: np.ndarray, expected: np.ndarray) -> tuple[float, float, float]:
    diff = np.abs(got.astype(np.float64) - expected)
    agree = float(np.mean(got.argmax(1) == expected.argmax(1)))
    return float(diff.max()), float(diff.mean()), agree


def measure(args) -> tuple[list[tuple], dict]:
    import onnxruntime
    import torch
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from bnfold import fuse_file

    size, n_calib, n_eval = (64, 16, 32) if args.quick else (224, 32, 64)
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((n_calib, 3, size, size)).astype(np.float32)
    evaluation = np.random.default_rng(2).standard_normal((n_eval, 3, size, size)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        unfused, model = build(tmp, size)
        with torch.no_grad():
            expected = model(torch.from_numpy(evaluation)).double().numpy()
        fused = Path(fuse_file(unfused, tmp / "resnet18.fused.onnx").output)
        pre = tmp / "resnet18.pre.onnx"
        quant_pre_process(str(unfused), str(pre))
        rows.append(("float, unfused (ONNX)", "—", *errors(logits(unfused, evaluation), expected)))
        rows.append(("float, bnfold-fused (ONNX)", "—", *errors(logits(fused, evaluation), expected)))
        for per_channel in (False, True):
            for name, src in (("quantize(model)", unfused), ("quantize(bnfold fold(model))", fused),
                              ("quantize(quant_pre_process(model))", pre)):
                start = time.perf_counter()
                q = quantize(src, tmp / f"q-{src.stem}-{per_channel}.onnx", calib, per_channel)
                print(f"{name} per_channel={per_channel}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
                rows.append((name, "per channel" if per_channel else "per tensor", *errors(logits(q, evaluation),
                                                                                           expected)))
    facts = {"size": size, "calib": n_calib, "eval": n_eval, "ort": onnxruntime.__version__, "torch": torch.__version__,
             "rms": float(np.sqrt(np.mean(expected ** 2)))}
    return rows, facts


def markdown(rows: list[tuple], facts: dict, command: str) -> str:
    lines = [
        "## Fold, then quantize (onnxruntime static int8)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, onnxruntime {facts['ort']}, "
        f"torch {facts['torch']}.",
        "",
        f"ResNet-18 (examples/zoo.py: torchvision's shapes, random weights, real BN statistics), inputs "
        f"1×3×{facts['size']}×{facts['size']}; {facts['calib']} calibration and {facts['eval']} other evaluation "
        f"samples, N(0, 1). `quantize_static` with QDQ, MinMax calibration, uint8 activations, int8 weights. "
        f"Errors of the 1000 logits against the float model in torch (logit RMS {facts['rms']:.3f}); "
        "top-1 = share of samples whose arg-max agrees.",
        "",
        "| model | weights | max abs error | mean abs error | top-1 agreement |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {w} | {mx:.4g} | {mean:.4g} | {agree:.1%} |" for name, w, mx, mean, agree in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64×64 inputs, fewer samples (a smoke run)")
    parser.add_argument("--out", type=Path, help="write the section into this markdown file")
    args = parser.parse_args()
    rows, facts = measure(args)
    command = "python benchmarks/quantize_after_fold.py" + (" --quick" if args.quick else "") + \
        (f" --out {args.out.name}" if args.out else "")
    text = markdown(rows, facts, command)
    print(text)
    if args.out:
        write_section(args.out, text, "quantize")


if __name__ == "__main__":
    main()
