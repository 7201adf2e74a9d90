"""Model inputs for verify, bench and calibrate: user shapes, seeded random data, .npz files."""
from __future__ import annotations

from .errors import UsageError


def parse_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """`NAME=D0,D1,…` (repeatable) → {NAME: [D0, D1, …]}."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, dims = spec.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"--shape expects NAME=D0,D1,… with integer dims, got {spec!r}") from None
        if not shapes[name] or any(d <= 0 for d in shapes[name]):
            raise UsageError(f"--shape {spec!r}: dimensions must be positive integers")
    return shapes
