"""ONNX: load and stream (io, wire), index the graph (index, readers), values computed from
constants (const_eval), what folds and how (affine, rules_before, rules_through, rules_after,
rules_branches, standalone), apply (fold_pass), and the stages' ONNX halves (fuse, verify,
bench, variance, calibrate)."""
