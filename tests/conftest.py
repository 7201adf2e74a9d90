import os
import sys

# Test helper modules (onnx_builders, shared cases) live beside the tests, one folder per package.
HERE = os.path.dirname(__file__)
for folder in ("", "onnxfold", "torchfold", "check", "stages", "cli"):
    sys.path.insert(0, os.path.join(HERE, folder))
