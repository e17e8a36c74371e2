"""Checks of the public API's arguments, shared by its entry points: each raises naming the argument."""

from __future__ import annotations

import os


def check_flag(name: str, value, none: str | None = None) -> None:
    """A bool option: True or False (a truthy "no" is not True); also None where `none` says what it means."""
    if isinstance(value, bool) or (none is not None and value is None):
        return
    allowed = "True or False" if none is None else f"True, False or None ({none})"
    raise ValueError(f"{name} must be {allowed}, got {type(value).__name__} {value!r:.80}")


def check_path(name: str, value, none: str | None = None) -> None:
    """A file path: a str or os.PathLike; also None where `none` says what it means."""
    if isinstance(value, (str, os.PathLike)) or (none is not None and value is None):
        return
    allowed = "a str or os.PathLike (a file path)" + ("" if none is None else f" or None ({none})")
    raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r:.80}")
