"""onnxruntime sessions: providers by short name, optimization levels, one place for options."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import onnxruntime as ort

from ..errors import BadInput, MissingProvider

# Short names users type → onnxruntime's names. Any full name onnxruntime knows is accepted too.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "nv-tensorrt-rtx": "NvTensorRTRTXExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "acl": "ACLExecutionProvider",
    "cann": "CANNExecutionProvider",
    "vitisai": "VitisAIExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}


def _replacing(dist: str, extra: str = "") -> str:
    """Each of these wheels installs the same `onnxruntime` package as the plain CPU one: beside
    it, the two share one folder, and uninstalling either breaks the other."""
    return (f"{dist} in place of onnxruntime{extra}: pip uninstall onnxruntime, then pip install {dist} "
            "(installed side by side, the two share one package folder and removing either breaks the other)")


# What to install for a provider this onnxruntime lacks.
INSTALL_HINT = {
    "CUDAExecutionProvider": _replacing("onnxruntime-gpu", " (and a CUDA driver and cuDNN)"),
    "TensorrtExecutionProvider": _replacing("onnxruntime-gpu", ", with TensorRT's libraries on the library path"),
    "NvTensorRTRTXExecutionProvider": "an onnxruntime build with TensorRT RTX",
    "OpenVINOExecutionProvider": _replacing("onnxruntime-openvino"),
    "DmlExecutionProvider": _replacing("onnxruntime-directml", " (Windows)"),
    "ROCMExecutionProvider": "an onnxruntime build with ROCm (AMD's onnxruntime-rocm wheels)",
    "MIGraphXExecutionProvider": _replacing("onnxruntime-migraphx", " (AMD)"),
    "CoreMLExecutionProvider": "onnxruntime on macOS (pip install onnxruntime)",
    "QNNExecutionProvider": _replacing("onnxruntime-qnn", " (Qualcomm)"),
    "DnnlExecutionProvider": "an onnxruntime build with oneDNN",
    "XnnpackExecutionProvider": "an onnxruntime build with XNNPACK",
}
LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # what InferenceSession does by default
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_providers() -> list[str]:
    """onnxruntime's names of the providers this build has, short names where there is one."""
    short = {full: name for name, full in reversed(list(PROVIDERS.items()))}
    return [short.get(full, full) for full in ort.get_available_providers() if full != "AzureExecutionProvider"]


def provider_name(name: str) -> str:
    """A provider's full onnxruntime name from a short or full name; MissingProvider (exit 2,
    naming what to install) if this onnxruntime does not have it."""
    full = PROVIDERS.get(name.lower())
    if full is None:
        full = next((p for p in ort.get_all_providers() if p.lower() == name.lower()
                     or p.lower() == f"{name.lower()}executionprovider"), None)
    if full is None:
        raise MissingProvider(f"unknown execution provider {name!r}; known: {', '.join(sorted(set(PROVIDERS)))} "
                              "or any onnxruntime provider name")
    if full not in ort.get_available_providers():
        hint = INSTALL_HINT.get(full, "an onnxruntime build that has it")
        raise MissingProvider(f"onnxruntime has no {full} here (installed: "
                              f"{', '.join(ort.get_available_providers())}); it needs {hint}")
    return full


def session(model: str | Path | bytes, provider: str = "cpu", level: str = "disabled",
            threads: int | None = None, spinning: bool = True, data_dir: Path | None = None) -> ort.InferenceSession:
    """A session with the given optimization level; a model ORT cannot load is bad input.

    `spinning=False` stops idle worker threads from busy-waiting after a run: when two
    sessions take turns (bench), one session's spinning threads would otherwise steal the
    cores the other one is timed on. `data_dir`: where a model given as bytes keeps the
    payloads its tensors reference (its file's folder).
    """
    options = _options(level, threads, spinning)
    if data_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
    return _create(model, options, provider)


def _options(level: str, threads: int | None, spinning: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if level not in LEVELS:
        raise BadInput(f"unknown optimization level {level!r}; known: {', '.join(LEVELS)}")
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 4  # fatal only: its errors come back as exceptions, said in one line
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def _create(model: str | Path | bytes, options: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    providers = [provider_name(provider)]
    if providers[0] != PROVIDERS["cpu"]:
        providers.append(PROVIDERS["cpu"])
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 — onnxruntime raises its own Fail/InvalidGraph/... types
        where = None if isinstance(model, bytes) else model
        raise BadInput(f"onnxruntime cannot load the model: {_first_line(exc)}", where) from None


def node_placement(model: str | Path, provider: str, level: str, feeds: dict, threads: int | None = None
                   ) -> dict[str, int]:
    """How many nodes each execution provider ran, from one profiled run: a GPU provider that
    hands some nodes back to the CPU says so, and a CPU number is not read as a GPU one."""
    with tempfile.TemporaryDirectory(prefix="bnfold-profile-") as tmp:
        options = _options(level, threads, spinning=False)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        sess = _create(model, options, provider)
        run_session(sess, feeds, None if isinstance(model, bytes) else Path(model))
        profile = Path(sess.end_profiling())
        return placement_counts(json.loads(profile.read_text()))


def placement_counts(events: list[dict]) -> dict[str, int]:
    """Nodes per provider in an onnxruntime profile (each node's kernel-run event)."""
    nodes: dict[str, str] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and "provider" in args and str(event.get("name", "")).endswith("_kernel_time"):
            nodes[args.get("node_name") or event["name"]] = args["provider"]
    counts: dict[str, int] = {}
    for provider in nodes.values():
        counts[provider] = counts.get(provider, 0) + 1
    return counts


def run_session(sess: ort.InferenceSession, feeds: dict, path: Path | None = None,
                names: list[str] | None = None) -> dict:
    """The outputs (default: all) by name; a model or inputs onnxruntime cannot run are bad
    input, not a bug."""
    names = names or [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, feeds)
    except Exception as exc:  # noqa: BLE001 — onnxruntime raises its own Fail/InvalidArgument/... types
        raise BadInput(f"onnxruntime cannot run the model on these inputs: {_first_line(exc)}", path) from None
    return dict(zip(names, values))


def _first_line(exc: Exception, limit: int = 600) -> str:
    """onnxruntime's message, whole: its first line, or its sentences up to `limit` characters."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    if len(line) <= limit:
        return line
    cut = line.rfind(". ", 0, limit)
    return line[: cut + 1] if cut > 0 else line[:limit] + "…"
