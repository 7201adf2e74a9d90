"""ONNX: load and stream (io, wire), index the graph (index, readers, nodes), values computed from
constants (const_eval) or behind DequantizeLinear (qdq), what folds and how (affine; site, the
rules' vocabulary; rules, the one registry, with rules_before, rules_after, rules_through and
rules_quantized; rules_branches and standalone), apply
(fold_pass), and the stages' ONNX halves (fuse, verify, bench, variance, calibrate)."""
