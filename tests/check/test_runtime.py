"""onnxruntime providers by short or full name, what to install for a missing one, and node
placement from a profiled run."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from bnfold.check.runtime import PROVIDERS, available_providers, node_placement, placement_counts, provider_name
from bnfold.errors import MissingProvider
from onnx_builders import bn_inits, bn_node, init, make_model, vi


@pytest.mark.parametrize("name", ["cpu", "CPU", "CPUExecutionProvider", "cpuexecutionprovider", "Cpu"])
def test_cpu_by_any_name(name):
    assert provider_name(name) == "CPUExecutionProvider"


@pytest.mark.parametrize("name, full, hint", [
    ("cuda", "CUDAExecutionProvider", "onnxruntime-gpu"),
    ("CUDAExecutionProvider", "CUDAExecutionProvider", "onnxruntime-gpu"),
    ("tensorrt", "TensorrtExecutionProvider", "TensorRT"),
    ("trt", "TensorrtExecutionProvider", "TensorRT"),
    ("openvino", "OpenVINOExecutionProvider", "onnxruntime-openvino"),
    ("dml", "DmlExecutionProvider", "onnxruntime-directml"),
    ("directml", "DmlExecutionProvider", "onnxruntime-directml"),
    ("coreml", "CoreMLExecutionProvider", "macOS"),
    ("rocm", "ROCMExecutionProvider", "ROCm"),
])
def test_missing_provider_names_what_to_install(name, full, hint):
    if full in ort.get_available_providers():
        pytest.skip(f"{full} is installed here")
    with pytest.raises(MissingProvider) as err:
        provider_name(name)
    assert full in str(err.value) and hint in str(err.value) and err.value.exit_code == 2


@pytest.mark.parametrize("name, dist", [("openvino", "onnxruntime-openvino"), ("cuda", "onnxruntime-gpu"),
                                        ("dml", "onnxruntime-directml")])
def test_a_wheel_that_replaces_onnxruntime_is_said_to_replace_it(name, dist):
    """These wheels install the onnxruntime package too: beside the CPU wheel, removing one breaks
    the other, so the hint says to uninstall onnxruntime first."""
    if PROVIDERS[name] in ort.get_available_providers():
        pytest.skip(f"{PROVIDERS[name]} is installed here")
    with pytest.raises(MissingProvider) as err:
        provider_name(name)
    assert f"pip uninstall onnxruntime, then pip install {dist}" in str(err.value)


def test_unknown_provider_lists_the_known_short_names():
    with pytest.raises(MissingProvider, match="unknown execution provider 'warp'.*cuda"):
        provider_name("warp")


def test_available_providers_use_short_names():
    names = available_providers()
    assert "cpu" in names and "CPUExecutionProvider" not in names


def test_node_placement_counts_every_node_of_a_cpu_run(tmp_path):
    rng = np.random.default_rng(0)
    inits = [init("W", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32))] + bn_inits("bn", 8, rng)
    nodes = [helper.make_node("Conv", ["input", "W"], ["z"], name="conv"), bn_node("z", "y")]
    path = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [vi("input", [1, 3, 8, 8])], [vi("y", None)], inits), str(path))
    feeds = {"input": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)}
    assert node_placement(path, "cpu", "disabled", feeds, threads=1) == {"CPUExecutionProvider": 2}


def test_placement_counts_from_profile_events():
    events = [
        {"cat": "Session", "name": "model_run", "args": {}},
        {"cat": "Node", "name": "conv_kernel_time", "args": {"provider": "CUDAExecutionProvider", "node_name": "conv"}},
        {"cat": "Node", "name": "conv_fence_before", "args": {"provider": "CUDAExecutionProvider"}},
        {"cat": "Node", "name": "topk_kernel_time", "args": {"provider": "CPUExecutionProvider", "node_name": "topk"}},
        {"cat": "Node", "name": "conv_kernel_time", "args": {"provider": "CUDAExecutionProvider", "node_name": "conv"}},
    ]
    assert placement_counts(events) == {"CUDAExecutionProvider": 1, "CPUExecutionProvider": 1}
