"""Precision types: the numeric formats, granularities and param specs. No torch.nn knowledge."""
