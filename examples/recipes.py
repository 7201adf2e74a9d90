"""What the first lines of each README recipe ("Where your model comes from") write, as
look-alikes with the same file layout, for where those lines cannot run in a test: they download
weights, convert the user's own Keras model, or are the user's training run, and torchvision,
timm, ultralytics and TensorFlow do not install beside our pinned torch.

tests/test_readme.py runs each recipe block: the lines before its first `bnfold` line as written
where `Recipe.module` imports and nothing is downloaded, else `write(name, folder)` here; every
line from the first `bnfold` on runs as written. The look-alikes are test-sized and pickled with
the classes of examples/ (zoo, spellings, lookalikes), so examples/ must be importable.

    python examples/recipes.py torchvision --out /tmp/recipe    # writes resnet18.pt, backbone.pt
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Recipe:
    write: Callable[[Path], list[Path]]
    module: str | None  # runs as written where this imports; None: never in a test (download, user's files)
    needs: tuple[str, ...] = field(default=())  # what the bnfold lines need installed (bnfold's extras)


def torchvision_files(folder: Path) -> list[Path]:
    """resnet18.pt: torch.save of a torchvision-shaped ResNet-18; backbone.pt: a detector's
    ResNet body, built with FrozenBatchNorm2d as torchvision's detection models are."""
    import spellings
    import zoo

    torch.manual_seed(0)
    with torch.no_grad():
        resnet = zoo.fill_bn_stats(zoo.resnet18(width=8), (3, 32, 32))
    torch.save(resnet, folder / "resnet18.pt")
    torch.save(spellings.frozen_bn(), folder / "backbone.pt")
    return [folder / "resnet18.pt", folder / "backbone.pt"]


def timm_create_model(model_name: str, pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """timm.create_model for the look-alike: the named model at test width."""
    import zoo

    if model_name != "resnet50":
        raise ValueError(f"the look-alike timm knows resnet50 only, not {model_name}")
    torch.manual_seed(0)
    with torch.no_grad():
        return zoo.fill_bn_stats(zoo.resnet50(width=8), (3, 32, 32)).eval()


def timm_files(folder: Path) -> list[Path]:
    """resnet50.pth (a state_dict) and, where timm is missing, a `timm` module with create_model."""
    torch.save(timm_create_model("resnet50").state_dict(), folder / "resnet50.pth")
    (folder / "timm.py").write_text('"""Look-alike of timm for the README test."""\n'
                                    "from recipes import timm_create_model as create_model  # noqa: F401\n")
    return [folder / "resnet50.pth", folder / "timm.py"]


def ultralytics_files(folder: Path) -> list[Path]:
    """runs/detect/train/weights/best.pt as `yolo train` leaves it (model and ema in float16)."""
    import lookalikes
    from checkpoint_layouts import ultralytics_checkpoint

    model, _ = lookalikes.build("yolo")
    path = folder / "runs" / "detect" / "train" / "weights" / "best.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ultralytics_checkpoint(model), path)
    return [path]


def huggingface_files(folder: Path) -> list[Path]:
    """resnet-50/: a save_pretrained folder (a tiny transformers ResNet; config.json, model.safetensors)."""
    import hf_folders

    return [hf_folders.save(hf_folders.build("resnet"), folder / "resnet-50", "safetensors")]


LIGHTNING_CKPT = "lightning_logs/version_0/checkpoints/epoch=9-step=100.ckpt"


def lightning_net() -> torch.nn.Module:
    """The network a LightningModule holds as `self.model` (the user's mynet.build)."""
    import zoo

    return zoo.resnet18(width=8, num_classes=10)


def lightning_files(folder: Path) -> list[Path]:
    """A checkpoint with the keys Trainer.save_checkpoint writes, the state_dict's keys under
    `model.`; mynet.py, the user's module that builds the network."""
    import zoo

    torch.manual_seed(0)
    with torch.no_grad():
        net = zoo.fill_bn_stats(lightning_net(), (3, 32, 32))
    state = net.state_dict()
    prefixed = type(state)(("model." + k, v) for k, v in state.items())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    checkpoint = {"epoch": 9, "global_step": 100, "pytorch-lightning_version": "2.6.6", "state_dict": prefixed,
                  "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 10}}}},
                  "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None, "dirpath": "ckpts"}},
                  "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
                  "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1, "num_classes": 10}}
    path = folder / LIGHTNING_CKPT
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    (folder / "mynet.py").write_text('"""The user\'s network, as their LightningModule builds it."""\n'
                                     "from recipes import lightning_net as build  # noqa: F401\n")
    return [path, folder / "mynet.py"]


def keras_files(folder: Path) -> list[Path]:
    """keras.onnx as tf2onnx writes a Keras Conv2D → BatchNormalization → Dense → BatchNormalization
    model: NHWC input transposed for the Conv, the Conv's BN as BatchNormalization, the Dense's BN
    (tf.nn.batch_normalization on [N, C]) as per-feature Mul and Add after MatMul → Add(bias)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def const(name, *shape, low=-0.5, high=0.5):
        return numpy_helper.from_array(rng.uniform(low, high, shape).astype(np.float32), name)

    inits = [const("conv/kernel", 8, 3, 3, 3), const("conv/bias", 8), const("bn/gamma", 8, low=0.5, high=1.5),
             const("bn/beta", 8), const("bn/moving_mean", 8), const("bn/moving_variance", 8, low=0.5, high=2.0),
             const("dense/kernel", 8, 16), const("dense/bias", 16),
             const("batch_normalization_1/batchnorm/mul", 16, low=0.5, high=1.5),
             const("batch_normalization_1/batchnorm/sub", 16), const("dense_1/kernel", 16, 4), const("dense_1/bias", 4)]
    p = "sequential/"
    nodes = [
        helper.make_node("Transpose", ["input_1"], [p + "conv2d/Conv2D__6:0"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", [p + "conv2d/Conv2D__6:0", "conv/kernel", "conv/bias"], [p + "conv2d/BiasAdd:0"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1),
        helper.make_node("BatchNormalization", [p + "conv2d/BiasAdd:0", "bn/gamma", "bn/beta", "bn/moving_mean",
                                                "bn/moving_variance"], [p + "batch_normalization/FusedBatchNormV3:0"],
                         epsilon=0.001),
        helper.make_node("Relu", [p + "batch_normalization/FusedBatchNormV3:0"], [p + "re_lu/Relu:0"]),
        helper.make_node("Transpose", [p + "re_lu/Relu:0"], [p + "re_lu/Relu__12:0"], perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", [p + "re_lu/Relu__12:0"], [p + "gap/Mean:0"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", [p + "gap/Mean:0", "dense/kernel"], [p + "dense/MatMul:0"]),
        helper.make_node("Add", [p + "dense/MatMul:0", "dense/bias"], [p + "dense/BiasAdd:0"]),
        helper.make_node("Mul", [p + "dense/BiasAdd:0", "batch_normalization_1/batchnorm/mul"],
                         [p + "batch_normalization_1/batchnorm/mul_1:0"]),
        helper.make_node("Add", [p + "batch_normalization_1/batchnorm/mul_1:0", "batch_normalization_1/batchnorm/sub"],
                         [p + "batch_normalization_1/batchnorm/add_1:0"]),
        helper.make_node("Relu", [p + "batch_normalization_1/batchnorm/add_1:0"], [p + "re_lu_1/Relu:0"]),
        helper.make_node("MatMul", [p + "re_lu_1/Relu:0", "dense_1/kernel"], [p + "dense_1/MatMul:0"]),
        helper.make_node("Add", [p + "dense_1/MatMul:0", "dense_1/bias"], ["dense_1"]),
    ]
    graph = helper.make_graph(nodes, "tf2onnx", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT,
                                                                               ["unk__20", 16, 16, 3])],
                              [helper.make_tensor_value_info("dense_1", TensorProto.FLOAT, ["unk__21", 4])], inits)
    model = helper.make_model(graph, producer_name="tf2onnx", producer_version="1.17.0",
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, folder / "keras.onnx")
    return [folder / "keras.onnx"]


RECIPES = {
    "torchvision": Recipe(torchvision_files, None),  # downloads weights
    "timm": Recipe(timm_files, None),  # downloads weights
    "ultralytics": Recipe(ultralytics_files, None),  # a training run that downloads its data
    "huggingface": Recipe(huggingface_files, None, needs=("transformers",)),  # downloads the folder
    "lightning": Recipe(lightning_files, None),  # the user's training run
    "keras": Recipe(keras_files, None),  # converts the user's Keras model, with TensorFlow
    "quantize": Recipe(lambda folder: [], "onnxruntime"),  # starts from the bundled example
}


def write(name: str, folder: Path) -> list[Path]:
    """The files recipe `name`'s first lines write, written into `folder` by look-alikes."""
    return RECIPES[name].write(Path(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in write(args.name, args.out):
        print(path)


if __name__ == "__main__":
    main()
