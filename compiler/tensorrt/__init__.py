"""TensorRT: `vitc check` (explicit-quantization rules on a Q/DQ graph) and `vitc engine` (engine build, sidecar, profile)."""
