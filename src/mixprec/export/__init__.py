"""ONNX export: marker tracing, QDQ insertion, the encodings file and the coverage check."""
