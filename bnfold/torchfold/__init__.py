"""PyTorch: load and write checkpoints (io, convert), fold on the dataflow graph of each kind
(fx for eager modules, script for TorchScript, export for torch.export programs, sharing
params), and the stages' torch halves (fuse, run for verify, variance, calibrate).
Importing this package imports torch."""
