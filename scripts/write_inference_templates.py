"""Write every repository bundle's standalone ``configs/inference.json`` from its train.json defaults
(:func:`prod9_components.zoo.template.template_config`, the exporter's builders): run after changing a builder or a
train.json default; ``tests/unit/test_inference_templates.py`` fails until the files match.

Usage (from the repository root):  python scripts/write_inference_templates.py [--check]
``--check`` writes nothing and exits 1 naming each file that differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prod9_components.cli.bundle_runner import bundles_root
from prod9_components.zoo.inference import BUILDERS
from prod9_components.zoo.template import template_config


def template_text(stage: str) -> str:
    """The file's text in the zoo's format: 4-space JSON with a final newline."""
    return json.dumps(template_config(stage, bundles_root() / stage), indent=4) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file differs")
    check = parser.parse_args().check
    differs = []
    for stage in BUILDERS:
        path = bundles_root() / stage / "configs" / "inference.json"
        text = template_text(stage)
        if path.is_file() and path.read_text() == text:
            continue
        differs.append(path)
        if not check:
            path.write_text(text)
    for path in differs:
        print(f"{path}: {'differs from its template' if check else 'written'}")
    return 1 if check and differs else 0


if __name__ == "__main__":
    sys.exit(main())
