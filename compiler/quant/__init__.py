"""What gets quantized and how: policies and presets, the per-layer plan, the TensorRT residual plan entries."""
