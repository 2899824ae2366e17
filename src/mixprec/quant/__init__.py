"""Quantization math, calibration observers and the quantizer modules."""
