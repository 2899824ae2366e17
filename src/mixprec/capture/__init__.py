"""Graph capture: the recorded graph, op types, and call-site identity."""
