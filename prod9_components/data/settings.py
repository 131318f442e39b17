"""True/false bundle settings read the same way wherever a config hands one over."""

from __future__ import annotations

__all__ = ["bool_setting"]


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
