"""Name -> factory registries (attention blocks, skip fusions, models, metrics).

A lookup with a wrong name fails with the list of valid names::

    BLOCKS = Registry("block attention")
    @BLOCKS.register("se")
    class SqueezeExcitation(nn.Module): ...
    BLOCKS.get("sse")  # ValueError: unknown block attention 'sse'; valid names: se
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

__all__ = ["NONE_NAMES", "Registry", "is_none_name"]

NONE_NAMES = ("", "none", "identity")


def is_none_name(name: object) -> bool:
    """Whether a config setting names "no module": ``None``, ``""``, ``"none"`` or ``"identity"``
    (any case, surrounding blanks ignored).

    The one rule for every optional registry setting (``model.block_attention.name``,
    ``.bottleneck``, ``model.skip_fusion.name``, the MONAI baselines' checks): each accepts
    exactly these spellings, so a value accepted by one is accepted by all.
    """
    return name is None or (isinstance(name, str) and name.strip().lower() in NONE_NAMES)


class Registry:
    """A named mapping of factories with helpful errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, obj: Callable[..., Any] | None = None):
        """Register ``obj`` under ``name``; usable as a decorator."""

        def deco(o: Callable[..., Any]) -> Callable[..., Any]:
            key = name.lower()
            if key in self._items:
                raise KeyError(f"{self.kind} '{name}' registered twice")
            self._items[key] = o
            return o

        return deco(obj) if obj is not None else deco

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered under ``name`` (case-insensitive).

        Raises:
            ValueError: unknown name; the message lists the valid names.
        """
        key = str(name).lower()
        if key not in self._items:
            raise ValueError(f"unknown {self.kind} '{name}'; valid names: {', '.join(self.names())}")
        return self._items[key]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
