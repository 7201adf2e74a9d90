"""Who reads a value. A node that reads only its shape or dtype (Shape, Size, CastLike's
second input) does not see its values, so a fold that keeps shape and dtype may go on
whatever such nodes read; they follow the value to its new name."""
from __future__ import annotations

import onnx

from ..errors import Skip
from .index import ModelIndex, Scope

# op_type → the input that is read for its shape or dtype only
META_READERS = {"Shape": 0, "Size": 0, "CastLike": 1}


def meta_readers(scope: Scope, name: str) -> list[onnx.NodeProto]:
    """Live nodes of `scope` that read `name`, and read it only for its shape or dtype."""
    return [n for n in scope.nodes if id(n) not in scope.removed and name in n.input and _reads_meta_only(n, name)]


def _reads_meta_only(node: onnx.NodeProto, name: str) -> bool:
    slot = META_READERS.get(node.op_type)
    return slot is not None and node.domain in ("", "ai.onnx") and \
        all(i == slot for i, n in enumerate(node.input) if n == name)


def require_sole_use(index: ModelIndex, scope: Scope, node: onnx.NodeProto, value: str) -> None:
    """`value` (an output of `node`) feeds one node only, not counting shape and dtype readers."""
    if value in scope.outputs:
        raise Skip(f"output {value!r} of {node.op_type} is also a graph output")
    if len([o for o in node.output if o]) > 1:
        raise Skip(f"{node.op_type} {node.name!r} has several outputs")
    others = index.uses[value] - 1
    if others > 0:
        others -= sum(list(n.input).count(value) for n in meta_readers(scope, value))
    if others > 0:
        raise Skip(f"output {value!r} of {node.op_type} is also used by {others} other node(s)")


def move_meta_readers(index: ModelIndex, scope: Scope, old: str, new: str) -> None:
    """`old` is gone and `new` has its shape and dtype: its shape and dtype readers read `new`."""
    for reader in meta_readers(scope, old):
        for i, name in enumerate(reader.input):
            if name == old:
                reader.input[i] = new
                index.uses[old] -= 1
                index.uses[new] += 1
