"""Registration by name that refuses silent overwrites: metrics, detectors, layer rules, op rules and
dashboards are all registered through :func:`register`."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, TypeVar

V = TypeVar("V")


def _kind(value: Any) -> Any:
    """What an entry is: a class itself, or the class of an instance (rules are kept as instances)."""
    return value if isinstance(value, type) else type(value)


def register(
    registry: MutableMapping[Any, V], value: V, *keys: object, what: str, overwrite: bool = False
) -> None:
    """``registry[key] = value`` for every key, or for none: an entry of another class under any of the
    keys is replaced only with ``overwrite=True``."""
    for key in keys:
        known = registry.get(key)
        if known is not None and _kind(known) is not _kind(value) and not overwrite:
            raise ValueError(
                f"{what} {key!r} is already registered ({_kind(known).__qualname__!r}); "
                "pass overwrite=True to replace it"
            )
    for key in keys:
        registry[key] = value
