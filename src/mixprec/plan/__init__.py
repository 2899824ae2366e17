"""Mixed-precision planning: request records, target expansion and resolution into a plan."""
