"""Sensitivity analysis: which layers a precision hurts, and a profile to start from (docs/sensitivity.md)."""
