"""The sim's engine: quantizer placement, the quantized forward, calibration (local and distributed)."""
