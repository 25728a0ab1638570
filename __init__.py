"""vitc: an ONNX graph-rewriting compiler that turns vision transformers into int8 engines."""

__version__ = "0.1.0"
