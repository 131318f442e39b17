"""Dependencies are complete and the bundles say so: every distribution the package imports at run time is declared
in pyproject.toml, and each bundle's metadata pins exactly those (plus prod9_components at the project's version),
at versions the declared ranges allow (the versions the supported Pythons install, DESIGN §2)."""

from __future__ import annotations

import ast
import json
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import monai
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DECLARED = {Requirement(r).name.lower(): Requirement(r) for r in PROJECT["dependencies"]}
OPTIONAL = {Requirement(r).name.lower() for extra in ("tracking",) for r in PROJECT["optional-dependencies"][extra]}
# Metadata has its own keys for these three.
OWN_KEYS = {"torch": "pytorch_version", "monai": "monai_version", "numpy": "numpy_version"}


def imported_distributions() -> dict[str, str]:
    """``{distribution: a module of the package importing it}`` for every non-stdlib top-level import."""
    owners = packages_distributions()
    found = {}
    for path in sorted((ROOT / "prod9_components").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "prod9_components":
                    continue
                for dist in owners.get(top, [top]):
                    found.setdefault(dist.lower(), str(path.relative_to(ROOT)))
    return found


def test_every_imported_distribution_is_declared():
    undeclared = {d: where for d, where in imported_distributions().items() if d not in DECLARED.keys() | OPTIONAL}
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"


def test_bundles_pin_the_declared_dependencies_at_allowed_versions():
    expected = {"prod9_components"} | (DECLARED.keys() - OWN_KEYS.keys())
    pins = {}
    for meta_file in sorted((ROOT / "bundles").glob("*/configs/metadata.json")):
        meta = json.loads(meta_file.read_text())
        required = {k.lower(): v for k, v in meta["required_packages_version"].items()}
        assert required.keys() == expected, f"{meta_file}: {sorted(required.keys() ^ expected)}"
        assert required["prod9_components"] == PROJECT["version"], meta_file
        versions = {**required, **{dist: meta[key] for dist, key in OWN_KEYS.items()}}
        for dist, version in versions.items():
            if dist != "prod9_components":
                assert DECLARED[dist].specifier.contains(Version(version)), f"{meta_file}: {dist}=={version}"
        pins[meta_file.parts[-3]] = versions
    assert len(pins) == 7 and all(p == pins["maskgit_stage1"] for p in pins.values()), "bundles pin different versions"


# Declared dependencies no module of the package imports, each with where it is used (checked below).
USED_ELSEWHERE = {
    "einops": ("MONAI's attention blocks, in the MAISI networks",
               Path(monai.__file__).parent / "networks" / "blocks" / "selfattention.py", "einops"),
    "tensorboard": ("the bundles' TensorBoard handlers (torch.utils.tensorboard)",
                    ROOT / "bundles" / "maskgit_stage1" / "configs" / "train.json", "TensorBoardStatsHandler"),
    "matplotlib": ("the demo's PNG sheets", ROOT / "scripts" / "demo.py", "import matplotlib"),
}


def test_every_declared_dependency_is_used():
    """A dependency nothing uses costs every install its download (itk: 1.5 GB installed, never imported)."""
    unused = DECLARED.keys() - imported_distributions().keys() - OWN_KEYS.keys()
    assert unused == USED_ELSEWHERE.keys(), f"declared, never imported: {sorted(unused - USED_ELSEWHERE.keys())}"
    for dist, (why, path, marker) in USED_ELSEWHERE.items():
        assert marker in path.read_text(), f"{dist} ({why}): {marker!r} no longer in {path}"
