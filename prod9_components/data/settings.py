"""True/false and numeric bundle settings read the same way wherever a config hands one over."""

from __future__ import annotations

__all__ = ["bool_setting", "number_setting"]


def bool_setting(name: str, value) -> bool:
    """A bundle's true/false setting as a bool. ``--<name> false`` given to ``monai.bundle run`` reaches the config as
    the string ``"false"`` (fire keeps words it cannot parse as Python literals), which ``bool()`` would count as true.

    Raises:
        ValueError: anything but a bool, 0/1 or true/false/yes/no (any case), naming the setting and the value.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def number_setting(name: str, value, least: float) -> float:
    """A bundle's numeric setting (a loss weight) as a finite float >= ``least``; a string number ("20", as
    ``monai.bundle run --code_weight 20`` hands it over) is accepted.

    Raises:
        ValueError: anything else ("abc", None, NaN, inf, below ``least``), naming the setting and the value.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not least <= number < float("inf"):
        raise ValueError(f"{name} must be a finite number >= {least:g}, got {value!r}")
    return number
