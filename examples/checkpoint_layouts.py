"""Model files as people have them, written from an in-memory model: a full pickle, a training
checkpoint dict (ultralytics' best.pt for YOLO, timm's for the others), traced and scripted
TorchScript, a `.pt2`, and a state_dict under the prefixes Lightning, torch.compile and DDP add.
Used by tests/torchfold/test_checkpoints.py and examples/checkpoint_matrix.py."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

LAYOUTS = ["pickle", "checkpoint", "traced", "scripted", "pt2", "state_dict"]


def ultralytics_checkpoint(model: nn.Module) -> dict:
    """best.pt as ultralytics writes it: model and EMA as float16 modules, training state beside."""
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(1.01)
    return {"epoch": 41, "best_fitness": 0.62, "model": copy.deepcopy(model).half(), "ema": ema.half(),
            "updates": 1234, "optimizer": torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9).state_dict(),
            "train_args": {"model": "yolov8n.yaml", "imgsz": 64, "batch": 16}, "train_metrics": {"metrics/mAP50(B)": 0.7},
            "date": "2024-05-01T12:00:00", "version": "8.2.0", "license": "AGPL-3.0"}


def timm_checkpoint(model: nn.Module, family: str) -> dict:
    """A timm training checkpoint: state_dict and its EMA, epoch, arch, argparse args."""
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for m in ema.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.mul_(1.1)
    return {"epoch": 299, "arch": family, "state_dict": model.state_dict(), "state_dict_ema": ema.state_dict(),
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
            "args": argparse.Namespace(model=family, lr=0.1, epochs=300), "version": 2, "metric": 71.5}


PREFIXES = {"yolo": "model.", "repvgg": "_orig_mod.", "dla_hrnet": "module._orig_mod.", "levit": ""}


def state_dict_file(model: nn.Module, family: str) -> dict:
    """Lightning (model.), torch.compile (_orig_mod.), DDP of a compiled model, a plain one."""
    prefix = PREFIXES[family]
    state = model.state_dict()
    prefixed = type(state)((prefix + k, v) for k, v in state.items())
    prefixed._metadata = type(state._metadata)(((prefix + k).rstrip(".") if prefix else k, v)
                                               for k, v in state._metadata.items())
    if family == "yolo":
        return {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.2.0", "state_dict": prefixed,
                "hyper_parameters": {"lr": 0.01}}
    return prefixed


def write(layout: str, family: str, model: nn.Module, shape, folder: Path) -> tuple[Path, list[str], object]:
    """The file, the fuse arguments it needs, and what was saved (to compare against)."""
    x = torch.randn(2, *shape)
    path = folder / f"{family}.{'pt2' if layout == 'pt2' else 'pt'}"
    arch = ["--arch", f"lookalikes:{family}"]
    if layout == "pickle":
        torch.save(model, path)
        return path, ["--trust-pickle"], model
    if layout == "checkpoint":
        saved = ultralytics_checkpoint(model) if family == "yolo" else timm_checkpoint(model, family)
        torch.save(saved, path)
        return path, ["--trust-pickle"] + ([] if family == "yolo" else arch), saved
    if layout == "traced":
        torch.jit.save(torch.jit.trace(copy.deepcopy(model), x, check_trace=False), str(path))
        return path, [], model
    if layout == "scripted":
        torch.jit.save(torch.jit.script(copy.deepcopy(model)), str(path))
        return path, [], model
    if layout == "pt2":
        torch.export.save(torch.export.export(copy.deepcopy(model), (x,)), str(path))
        return path, [], model
    saved = state_dict_file(model, family)
    torch.save(saved, path)
    return path, arch, saved
