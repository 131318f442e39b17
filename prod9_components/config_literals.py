"""Strings and data written into a MONAI bundle config so that MONAI reads them back as themselves (DESIGN §10).

MONAI ``eval``-s a string starting with ``$``, follows ``@id`` references and ``%file#id`` macros, rewrites ``::``,
``@#`` and ``%#`` as ids, and instantiates a dict with ``_target_``. A flag value (``cli.literal_flags``) or a
checkpoint's record value (``zoo``) that holds such syntax must reach the config as a literal, never as code.
"""

from __future__ import annotations

__all__ = ["config_data", "is_config_syntax", "literal"]

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-./,=+")


def is_config_syntax(value: str) -> bool:
    """Whether MONAI's parser would change or run ``value`` instead of keeping it as a plain string."""
    return value.startswith(("$", "@", "%")) or "::" in value or "@#" in value or "%#" in value


def literal(value: str) -> str:
    """An expression that evaluates to exactly ``value``: ``$'...'`` with every character but ``_SAFE`` escaped.

    The escapes keep ``$ @ % # :`` and quotes out of the text, so MONAI finds no reference, macro or id in it, and
    ``eval`` of a string literal runs nothing.
    """
    escaped = "".join(c if c in _SAFE else f"\\x{ord(c):02x}" if ord(c) < 0x100 else
                      f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in value)
    return f"$'{escaped}'"


def config_data(value, source: str, what: str = "network_args"):
    """``value`` (a record's plain data) as it must stand in a MONAI config to mean itself: strings MONAI would
    evaluate or follow (``$...``, ``@...``, ``%...``) become string literals; a dict MONAI would instantiate or
    interpret (``_target_``, ``_requires_``, ...) is refused, naming ``source`` and the record field ``what``."""
    if isinstance(value, str):
        return literal(value) if is_config_syntax(value) else value
    if isinstance(value, dict):
        special = [k for k in value if str(k).startswith("_") and str(k).endswith("_")]
        if special:
            raise ValueError(f"{source}: {what} hold a config directive {special[0]!r}; expected plain data")
        return {k: config_data(v, source, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [config_data(v, source, what) for v in value]
    return value
