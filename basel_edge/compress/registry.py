"""Compression methods registered by name, so a new method is a new file."""

from __future__ import annotations

from ..errors import UserError
from .base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under `cls.name`."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]()
