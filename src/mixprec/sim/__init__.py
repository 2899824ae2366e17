"""The sim's engine: quantizer placement (``Place``), the quantized forward, calibration (local and
distributed), effective precisions, and the typed state its collaborators read (``state.py``).

Layer rules: docs/architecture.md. Nothing here imports ``mixprec.quantsim``.
"""
