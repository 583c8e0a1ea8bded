"""Field checks shared by :class:`hardneg.config.HardNegConfig` and the typed options of each component.

Every check raises :class:`ConfigError` naming the field, the value it got and the allowed range,
so a typo in a training script fails at start-up instead of hours later. Callers: the options
dataclasses (``BankOptions`` in bank.py, ``ConfusionOptions`` in confusion.py, ...) in their
``__post_init__``, and ``HardNegConfig.validate`` for the checks that span components.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "choice", "in_range", "int_at_least", "set_field"]


class ConfigError(ValueError):
    """A HardNegConfig field holds a value outside its allowed range."""


def set_field(obj: Any, name: str, value: Any) -> None:
    """Store a normalised value on a (possibly frozen) options dataclass during its validation."""
    object.__setattr__(obj, name, value)


def int_at_least(cfg: Any, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def in_range(
    cfg: Any,
    name: str,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or value != value:
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ConfigError(f"{name} must lie in {lb}{low}, {high}{hb}, got {value!r}")


def choice(cfg: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
