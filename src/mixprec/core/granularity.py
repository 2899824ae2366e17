"""Granularity types: how many encodings a quantizer holds and along which axis."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerTensor:
    """One scale/offset for the whole tensor."""

    def __str__(self) -> str:
        return "per_tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale/offset per slice along ``axis`` (output channels of a weight: axis 0)."""

    axis: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ValueError(f"PerChannel.axis must be an int, got {self.axis!r}")

    def __str__(self) -> str:
        return f"per_channel(axis={self.axis})"


@dataclass(frozen=True)
class PerBlock:
    """One scale per block of ``block_size`` consecutive values along ``axis``, per channel.

    For a Linear weight ``[out, in]``, ``PerBlock(block_size=64)`` gives one scale per
    output channel and per 64 input features (``axis=1``, the input dimension).
    """

    block_size: int
    axis: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"PerBlock.block_size must be a positive int, got {self.block_size!r}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ValueError(f"PerBlock.axis must be an int, got {self.axis!r}")

    def __str__(self) -> str:
        return f"per_block(block_size={self.block_size}, axis={self.axis})"


Granularity = PerTensor | PerChannel | PerBlock


_GRANULARITY_NAMES = ("per_tensor", "per_channel", "per_block")


def parse_granularity(
    value: object, *, axis: int | None = None, block_size: int | None = None
) -> Granularity:
    """A granularity object, or its name with ``axis`` / ``block_size``.

    Raises:
        ValueError: an unknown name, or a missing block size for ``per_block``.
    """
    if isinstance(value, (PerTensor, PerChannel, PerBlock)):
        return value
    if value == "per_tensor":
        return PerTensor()
    if value == "per_channel":
        return PerChannel(0 if axis is None else axis)
    if value == "per_block":
        if block_size is None:
            raise ValueError("granularity 'per_block' needs block_size (e.g. 64)")
        return PerBlock(block_size, 1 if axis is None else axis)
    raise ValueError(
        f"unknown granularity {value!r}; accepted: PerTensor(), PerChannel(axis), PerBlock(block_size, axis) "
        f"or one of {', '.join(_GRANULARITY_NAMES)}"
    )
