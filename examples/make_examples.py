"""Train a small CNN and a small MLP for a few steps on synthetic data and export them to ONNX.

The BN running statistics come from real training-mode batches (not the 0/1 defaults), so
folding them is a real test. BN nodes are kept in the export (no constant folding, eval mode).

    python examples/make_examples.py --out examples/models
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn


def small_cnn() -> nn.Module:
    """Conv+BN blocks (plain, strided, depthwise), a transposed conv, and a Linear+BN head."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 2, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10),
    )


def small_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 10),
    )


def train(model: nn.Module, input_shape: tuple[int, ...], steps: int = 30, seed: int = 0) -> nn.Module:
    """A few SGD steps on a synthetic classification task, so weights and BN statistics move."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(32, *input_shape, generator=g) * 2 + 0.5
        target = (x.flatten(1).sum(1) > x.flatten(1).sum(1).median()).long()
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def export(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    example = torch.randn(2, *input_shape)
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, do_constant_folding=False,
        training=torch.onnx.TrainingMode.EVAL, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
    )
    return path


EXAMPLES = {"cnn": (small_cnn, (3, 32, 32)), "mlp": (small_mlp, (64,))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "models")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (build, shape) in EXAMPLES.items():
        model = train(build(), shape, args.steps)
        torch.save(model.state_dict(), args.out / f"{name}.state_dict.pt")
        print(f"wrote {export(model, shape, args.out / f'{name}.onnx')}")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    main()
