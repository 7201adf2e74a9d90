"""ONNX: load and stream (io, wire), index the graph (index, readers, nodes), values computed from
constants (const_eval), what folds and how (affine; site, the rules' vocabulary; rules, the one
registry, with rules_before, rules_after and rules_through; rules_branches and standalone), apply
(fold_pass), and the stages' ONNX halves (fuse, verify, bench, variance, calibrate)."""
