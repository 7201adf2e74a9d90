import os
import sys

# Test helper modules (onnx_builders) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
