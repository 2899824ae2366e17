"""The one class mixprec still swaps: an ``nn.Sequential`` root's view (see docs/capture.md).

An ``nn.Sequential`` iterates over its children in ``forward``; the quantizer holders mixprec
registers on the root must not be among them. Every other module keeps its class.
"""

from __future__ import annotations

import sys

from torch import nn


class SequentialRootView:
    """For an ``nn.Sequential`` root: its forward, ``len`` and indexing see only the model's own
    children, not the quantizer holders mixprec registers on the root."""

    def _own_children(self) -> list[nn.Module]:
        return [m for name, m in self._modules.items() if not name.startswith("mixprec_")]

    def __iter__(self):
        return iter(self._own_children())

    def __len__(self) -> int:
        return len(self._own_children())

    def __getitem__(self, idx: int | slice) -> nn.Module:
        children = self._own_children()
        return nn.Sequential(*children[idx]) if isinstance(idx, slice) else children[idx]

    def __reduce_ex__(self, protocol: int) -> tuple:
        # the view class is made at run time: pickle the user's class, rebuild the view on load
        return (_new_view, (original_class(self),), self.__dict__)


def _new_view(cls: type) -> nn.Module:
    return object.__new__(_sequential_view(cls))


def quantized_class(cls: type, *, leaf: bool = False, root: bool = True) -> type:
    """The one class mixprec still swaps: an ``nn.Sequential`` root gets a view that hides the
    quantizer holders registered on it (its forward iterates over its children)."""
    if not (root and issubclass(cls, nn.Sequential)):
        return cls
    return _sequential_view(cls)


_VIEW_CACHE: dict[type, type] = {}


def _sequential_view(cls: type) -> type:
    if cls not in _VIEW_CACHE:
        module = sys.modules[__name__]
        name = f"Mixprec{cls.__name__}"
        while hasattr(module, name):
            name += "_"
        new = type(name, (SequentialRootView, cls), {"__module__": __name__, "_mixprec_original_class": cls})
        setattr(module, name, new)  # picklable by name
        _VIEW_CACHE[cls] = new
    return _VIEW_CACHE[cls]


def original_class(module: nn.Module) -> type:
    return getattr(type(module), "_mixprec_original_class", type(module))
