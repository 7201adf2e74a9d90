"""Options several commands share, declared once."""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Annotated, Optional

import typer

from ..errors import UsageError

Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
TrustPickle = Annotated[bool, typer.Option(help="Torch: allow unpickling a full-module checkpoint (runs its code).")]
Arch = Annotated[Optional[str], typer.Option(help="Torch state_dict: package.module:factory that builds the module.")]
ArchKwargs = Annotated[Optional[str], typer.Option(help="JSON keyword arguments for --arch.")]


def json_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--arch-kwargs is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError("--arch-kwargs must be a JSON object")
    return value


def torch_options(trust_pickle: bool, arch: str | None, arch_kwargs: str | None, **more) -> SimpleNamespace:
    """How to load a torch checkpoint, as the library's loaders read it."""
    return SimpleNamespace(trust_pickle=trust_pickle, arch=arch, arch_kwargs=json_kwargs(arch_kwargs), **more)
