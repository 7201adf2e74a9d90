"""onnxruntime sessions: providers by short name, optimization levels, one place for options."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..errors import BadInput, MissingProvider

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}
INSTALL_HINT = {
    "cuda": "pip install onnxruntime-gpu (and a CUDA driver)",
    "tensorrt": "pip install onnxruntime-gpu with TensorRT libraries",
    "openvino": "pip install onnxruntime-openvino",
    "dml": "pip install onnxruntime-directml",
    "rocm": "an onnxruntime build with ROCm",
    "coreml": "onnxruntime on macOS",
}
LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # what InferenceSession does by default
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build has."""
    installed = set(ort.get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in installed]


def provider_name(short: str) -> str:
    short = short.lower()
    if short not in PROVIDERS:
        raise MissingProvider(f"unknown execution provider {short!r}; known: {', '.join(PROVIDERS)}")
    if PROVIDERS[short] not in ort.get_available_providers():
        hint = INSTALL_HINT.get(short, "an onnxruntime build that has it")
        raise MissingProvider(f"onnxruntime has no {PROVIDERS[short]} here (installed: "
                              f"{', '.join(ort.get_available_providers())}); install {hint}")
    return PROVIDERS[short]


def session(model: str | Path | bytes, provider: str = "cpu", level: str = "disabled",
            threads: int | None = None, spinning: bool = True) -> ort.InferenceSession:
    """A session with the given optimization level; a model ORT cannot load is bad input.

    `spinning=False` stops idle worker threads from busy-waiting after a run: when two
    sessions take turns (bench), one session's spinning threads would otherwise steal the
    cores the other one is timed on.
    """
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if level not in LEVELS:
        raise BadInput(f"unknown optimization level {level!r}; known: {', '.join(LEVELS)}")
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    providers = [provider_name(provider)]
    if providers[0] != PROVIDERS["cpu"]:
        providers.append(PROVIDERS["cpu"])
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        where = None if isinstance(model, bytes) else model
        raise BadInput(f"onnxruntime cannot load the model: {_first_line(exc)}", where) from None


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
