"""Values of a checkpoint written into a bundle config as data (DESIGN §10): MONAI reads them back as themselves."""

from __future__ import annotations

from prod9_components.cli.literal_flags import is_config_syntax, literal

__all__ = ["config_data"]


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
