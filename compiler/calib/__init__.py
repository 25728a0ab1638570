"""Calibration: input data (photos, tensors), observers and the serializable table, the per-linear range search."""
