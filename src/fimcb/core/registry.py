"""Registration by name that refuses silent overwrites: metrics, detectors, layer rules, op rules and
dashboards are all registered through :func:`register`."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")


def _identity(value: Any) -> Any:
    return value


def register(
    registry: MutableMapping[K, V],
    key: K,
    value: V,
    *,
    what: str,
    overwrite: bool = False,
    kind: Callable[[V], Any] = _identity,
) -> None:
    """``registry[key] = value``; an entry of another ``kind`` (the value itself, or e.g. its type for
    registries of instances) under ``key`` is replaced only with ``overwrite=True``."""
    known = registry.get(key)
    if known is not None and kind(known) is not kind(value) and not overwrite:
        other = kind(known)
        raise ValueError(
            f"{what} {key!r} is already registered ({getattr(other, '__qualname__', other)!r}); "
            "pass overwrite=True to replace it"
        )
    registry[key] = value
