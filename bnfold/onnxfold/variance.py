"""`--variance biased` on ONNX: every inference BN's stored variance × m/(m−1) (README, "The m/(m−1) correction").

m is the training batch size times the BN input's static spatial size (from shape
inference), or the values per channel given; the math is in bnfold.population.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..errors import BadInput
from ..fold_math import cast_exact
from ..options import VarianceOptions
from ..population import correction_factor, spatial_size, values_per_channel
from ..report import VarianceCorrection
from .affine import BN, is_standard
from .index import ModelIndex, NotConstant


def correct_biased_variance(model: onnx.ModelProto, base_dir: Path | str, options: VarianceOptions,
                            path: str | None = None) -> list[VarianceCorrection]:
    """Multiply every BN's stored variance by m/(m−1), in place on `model`."""
    index = ModelIndex(model, base_dir)
    corrections = []
    for scope in index.scopes:
        for bn in scope.nodes:
            if not is_standard(bn, BN) or len(bn.input) < 5:
                continue
            name = bn.name or bn.output[0]
            m = values_per_channel(options.train_batch_size, options.values_per_channel,
                                   spatial_size(index.shape(bn.input[0])), name, path)
            factor = correction_factor(m)
            try:
                var = index.constant(scope, bn.input[4])
            except NotConstant as exc:
                raise BadInput(f"BN {name!r}: its variance is not constant ({exc})", path) from None
            corrected = cast_exact(var.astype(np.float64) * factor, var.dtype, "variance")
            index.replace_input(scope, bn, 4, corrected, f"{name}_var")
            corrections.append(VarianceCorrection(name, m, factor))
    index.apply()
    return corrections
