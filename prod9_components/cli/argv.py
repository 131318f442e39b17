"""Command-line spelling fixes applied before python-fire parses argv.

fire takes one token per flag value, so ``--roi-size 64 64 64`` fails (the 2nd and 3rd 64 become stray
positional arguments); fire wants ``--roi-size [64,64,64]``. The training workflows use the first spelling,
so every prod9 command rewrites it into the second before calling fire.
"""

from __future__ import annotations

import logging
import re
import sys

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _is_number(token: str) -> bool:
    return bool(_NUMBER.match(token))


def normalise_multi_value_flags(argv: list[str], name_list_flags: tuple[str, ...] = ()) -> list[str]:
    """Join a flag's 2+ space-separated number values into one list literal.

    ``["--shape", "48", "48", "32", "--seed", "1"]`` -> ``["--shape", "[48,48,32]", "--seed", "1"]``.
    A flag followed by a single value, ``--flag=value`` forms, and non-number values are left as they are, except
    for ``name_list_flags`` (e.g. ``--source-modality T1 T1ce``), whose 2+ bare words become a list of strings.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        out.append(token)
        i += 1
        if token.startswith("--") and "=" not in token:
            j = i
            if token in name_list_flags:
                while j < len(argv) and not argv[j].startswith("-"):
                    j += 1
                if j - i >= 2:
                    out.append("[" + ",".join(f"'{word}'" for word in argv[i:j]) + "]")
                    i = j
                continue
            while j < len(argv) and _is_number(argv[j]):
                j += 1
            if j - i >= 2:
                out.append("[" + ",".join(argv[i:j]) + "]")
                i = j
    return out


# Flags renamed to the one vocabulary shared by both families (diffusers / MONAI names): old spelling -> new.
RENAMED_FLAGS = {"--num-steps": "--num-inference-steps",
                 # sample (and score the samples) at every validation: one name for every sampling stage
                 "--generate-during-validation": "--sample-during-validation",
                 "--translate-during-validation": "--sample-during-validation"}


def rename_deprecated_flags(argv: list[str] | None, renames: dict[str, str] = RENAMED_FLAGS) -> list[str]:
    """Rewrite each deprecated flag (``--num-steps 8``, ``--num_steps=8``) to its new name, with a one-line
    deprecation warning on stderr each. ``argv`` None reads ``sys.argv[1:]``."""
    out = []
    for token in list(sys.argv[1:] if argv is None else argv):
        flag, eq, value = token.partition("=")
        new = renames.get(flag.replace("_", "-")) if flag.startswith("--") else None
        if new is not None:
            logging.getLogger("prod9").warning(f"{flag} is deprecated: use {new} (same meaning)")
            token = new + eq + value
        out.append(token)
    return out
