"""Paths of the bundled config presets, under the reference's helper names."""

from __future__ import annotations

from importlib import resources


def get_path_for_per_channel_config() -> str:
    """Path of the bundled ``per_channel`` preset (per-channel weights), as the reference's
    helper of the same name returns its per-channel config file."""
    return str(resources.files("mixprec.config") / "presets" / "per_channel.json")
