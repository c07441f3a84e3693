"""Settings dataclasses read back from files (model files, training run states): strictly.

`config_from_dict` refuses keys the dataclass does not have, instead of dropping them, so a file
written by another version or edited by hand fails with a clear `ConfigError` naming the keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import TypeVar

from netvlad.errors import NetVLADError

T = TypeVar("T")


class ConfigError(NetVLADError, ValueError):
    """A settings value out of range, or a stored config with unknown or missing keys."""


def config_from_dict(cls: type[T], data: Mapping, what: str) -> T:
    """The dataclass `cls` built from `data` (its field names → values); `what` names it in errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping of settings, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {what} keys: {', '.join(map(str, unknown))}")
    try:
        return cls(**data)
    except TypeError as exc:  # a required field missing
        raise ConfigError(f"bad {what}: {exc}") from None
