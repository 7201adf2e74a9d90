"""The model families × checkpoint layouts table: BNs folded / kept and the largest error of the
fused model against the unfused one, run in torch on random inputs.

    python examples/checkpoint_matrix.py            # prints a Markdown table
"""
from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lookalikes  # noqa: E402
from checkpoint_layouts import LAYOUTS, PREFIXES, write  # noqa: E402

from bnfold import FuseOptions, LoadOptions, fuse_file  # noqa: E402


def outputs(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in outputs(v)] if isinstance(value, (tuple, list)) else []


def error(fused, original, x) -> tuple[float, float]:
    """Largest |fused − original| over all outputs, and that over k·RMS (verify's atol)."""
    with torch.no_grad():
        pairs = list(zip(outputs(original(x)), outputs(fused(x))))
    worst = max((g.double() - w.double()).abs().max().item() for w, g in pairs)
    k = 0.15 if x.dtype == torch.float16 else 1e-4
    return worst, max((g.double() - w.double()).abs().max().item() / (k * w.double().pow(2).mean().sqrt().item())
                      for w, g in pairs)


def from_state(family: str, state: dict, prefix: str) -> torch.nn.Module:
    module = lookalikes.FAMILIES[family][0]()
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)
    return module.eval()


def fused_pairs(layout: str, family: str, saved, out: Path, model) -> list[tuple]:
    """(fused, original, half) for each weight set in the output."""
    if layout == "checkpoint":
        fused = torch.load(out, weights_only=False)
        if family == "yolo":
            return [(fused[k].eval(), saved[k].eval(), True) for k in ("model", "ema")]
        return [(from_state(family, fused[k], ""), from_state(family, saved[k], ""), False)
                for k in ("state_dict", "state_dict_ema")]
    if layout == "state_dict":
        fused = torch.load(out, weights_only=True)
        fused = fused["state_dict"] if family == "yolo" else fused
        return [(from_state(family, fused, PREFIXES[family]), model, False)]
    if layout == "pickle":
        return [(torch.load(out, weights_only=False).eval(), model, False)]
    if layout in ("traced", "scripted"):
        return [(torch.jit.load(str(out)), model, False)]
    return [(torch.export.load(str(out)).module(), model, False)]


def row(family: str, layout: str, folder: Path) -> str:
    model, shape = lookalikes.build(family)
    src, args, saved = write(layout, family, model, shape, folder)
    arch = args[args.index("--arch") + 1] if "--arch" in args else None
    load = LoadOptions(trust_pickle="--trust-pickle" in args, arch=arch)
    report = fuse_file(src, options=FuseOptions(load=load))
    x = torch.randn(2, *shape)
    errors = [error(f, o, x.half() if half else x) for f, o, half in fused_pairs(layout, family, saved,
                                                                                    Path(report.output), model)]
    worst = max(e for e, _ in errors), max(r for _, r in errors)
    sets = ", ".join(f"{w.name or '-'} ({w.dtype})" for w in report.weight_sets)
    return (f"| {family} | {layout} | {sets} | {len(report.folded)} | {len(report.skipped)} | {report.identity_bns} "
            f"| {worst[0]:.2e} | {worst[1]:.3f} |")


def main() -> None:
    warnings.simplefilter("ignore")
    print("| family | layout | weight sets | folded | kept | left as identity | max abs error | / verify atol |")
    print("|---|---|---|---|---|---|---|---|")
    for family in lookalikes.FAMILIES:
        for layout in LAYOUTS:
            with tempfile.TemporaryDirectory() as folder:
                print(row(family, layout, Path(folder)), flush=True)
    print(f"\n(made by: python examples/checkpoint_matrix.py; torch {torch.__version__})")


if __name__ == "__main__":
    main()
