"""ONNX: load and stream (io, wire), index the graph (index), what folds and how (affine,
rules_before, rules_after, standalone), apply (fold_pass), and the stages' ONNX halves
(fuse, verify, bench, variance, calibrate)."""
