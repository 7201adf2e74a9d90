"""Format-free checking: compare outputs, read and make input arrays, onnxruntime sessions,
timing statistics."""
