"""Flag values are data: turn them into bundle overrides MONAI will not evaluate.

A bundle override is parsed like the bundle's own JSON: a string starting with ``$`` is ``eval``-ed, ``@id`` is a
reference, ``%file#id`` a macro that reads a file, ``::`` and ``@#``/``%#`` are rewritten as (relative) ids, and a
dict with ``_target_`` is instantiated. So ``--seed '$open("x","w")'`` would run code. Here every flag value is
passed literally:

- a string MONAI would interpret becomes an expression that evaluates to exactly that string (a Python string
  literal written with ``\\x`` escapes only for the characters MONAI looks at, so nothing in it is interpreted);
  a path that really starts with ``$`` keeps working;
- where the bundle's default for the id is not a string (``seed``, ``roi_size``, ``epochs``...) such a string is
  refused in one line naming the flag and the expected type;
- a dict holding a MONAI component key (``_target_``...) is refused: components belong in a ``--config`` file;
- where the default is a boolean, ``true`` / ``false`` in any case become booleans (the command line hands
  ``--amp false`` over as the word ``'false'``, which Python reads as true); any other word where the default is a
  boolean or a number is refused in one line.

The CLI's own overrides that are meant as expressions are marked :class:`Expression` and pass unchanged.
"""

from __future__ import annotations

from typing import Any

from monai.bundle.config_item import ConfigComponent

from prod9_components.config_literals import is_config_syntax, literal


class Expression(str):
    """A bundle expression the CLI itself writes (e.g. ``$[r // @downsample_factor for r in [64, 64, 64]]``)."""


class FlagValueError(ValueError):
    """A flag value that would be config syntax where the bundle expects a number, list or boolean."""


def literal_value(value: Any, flag: str, default: Any = None) -> Any:
    """``value`` with every nested string MONAI would interpret made literal (see module docstring).

    Args:
        value: a flag value as fire parsed it (str, number, bool, None, list/tuple, dict).
        flag: the flag as the user wrote it (``--seed``), for errors.
        default: the bundle's raw value for the id; a non-string default means the flag is typed.
    """
    if isinstance(value, Expression):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if isinstance(default, bool) and word in ("true", "false"):
            return word == "true"
        syntax = is_config_syntax(value)
        # a word where a boolean or number (bool is an int) is expected (`--seed abc`) would fail later, deep in the run
        if isinstance(default, (int, float)) or (syntax and default is not None and not isinstance(default, str)):
            raise FlagValueError(f"{flag}: expected {_kind(default)} like the bundle's default {default!r}, got "
                                 f"{value!r}" + (" (flag values are data, never bundle expressions)" if syntax else ""))
        return literal(value) if syntax else value
    if isinstance(value, dict):
        special = sorted(set(value) & ConfigComponent.non_arg_keys)
        if special:
            raise FlagValueError(f"{flag}: a flag value cannot hold {', '.join(special)} (flag values are data; "
                                 f"put components in a --config file)")
        defaults = default if isinstance(default, dict) else {}
        return {k: literal_value(v, flag, defaults.get(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = list(default) if isinstance(default, (list, tuple)) else []
        return [literal_value(v, flag, items[min(i, len(items) - 1)] if items else None) for i, v in enumerate(value)]
    return value


def literal_overrides(overrides: dict[str, Any], defaults: Any) -> dict[str, Any]:
    """Every override made literal; ``defaults.get(id)`` gives the bundle's raw value (a MONAI ``ConfigParser``)."""
    return {key: literal_value(value, flag_name(key), defaults.get(key)) for key, value in overrides.items()}


def flag_name(key: str) -> str:
    """``--seed`` for ``seed``; ids with ``#`` are spelled as given."""
    return f"--{key if '#' in key else key.replace('_', '-')}"


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, (int, float)):
        return "a number"
    if isinstance(default, (list, tuple)):
        return "a list"
    return f"a {type(default).__name__}"
