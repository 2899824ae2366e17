"""Quantization math (encodings and fake quant; histograms and range search), calibration
observers and the quantizer modules."""
