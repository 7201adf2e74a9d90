"""Hugging Face `save_pretrained` folders of tiny models built from a config (no download): a
ResNet and a MobileNetV2 as transformers defines them, with real BN statistics, saved as
model.safetensors, as safetensors shards with their index, and as pytorch_model.bin (what
transformers 4 wrote with safe_serialization=False; transformers 5 reads it still). Each folder
also holds a preprocessor_config.json, as an image model's folder does.
Used by tests/torchfold/test_hf.py and the README.

    python examples/hf_folders.py --out examples/models      # writes examples/models/hf-resnet/ …
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from zoo import fill_bn_stats

LAYOUTS = ("safetensors", "sharded", "bin")
PREPROCESSOR = {"do_normalize": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
                "image_processor_type": "ConvNextImageProcessor", "image_std": [0.229, 0.224, 0.225],
                "size": {"shortest_edge": 32}}


def build(name: str) -> torch.nn.Module:
    """A tiny transformers model with random weights and real running statistics."""
    import transformers

    torch.manual_seed(0)
    if name == "resnet":
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
        model = transformers.ResNetForImageClassification(config)
    elif name == "mobilenet_v2":
        config = transformers.MobileNetV2Config(depth_multiplier=0.25, image_size=32, num_labels=3)
        model = transformers.MobileNetV2ForImageClassification(config)
    else:
        raise ValueError(name)
    with torch.no_grad():
        return fill_bn_stats(model, (3, 32, 32))


def save(model: torch.nn.Module, folder: Path, layout: str) -> Path:
    """`model` saved as `layout` in `folder`, beside a preprocessor_config.json."""
    folder = Path(folder)
    if layout == "bin":
        folder.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(folder, max_shard_size=math.ceil(size / 3) if layout == "sharded" else "50GB")
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/models"))
    args = parser.parse_args()
    for name in ("resnet", "mobilenet_v2"):
        model = build(name)
        for layout in LAYOUTS:
            tag = "" if layout == "safetensors" else f"-{layout}"
            print(save(model, args.out / f"hf-{name}{tag}".replace("_", "-"), layout))


if __name__ == "__main__":
    main()
