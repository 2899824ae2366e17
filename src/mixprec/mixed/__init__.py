"""Manual mixed precision for users: the configurator and profiles."""
