"""Find BraTS cases on disk, check them, split them, and read/write MONAI datalists.

A case is a dict of absolute paths: ``{"case": name, "t1": ..., "t1ce": ..., "t2": ..., "flair": ...,
"seg": ...}`` ("seg" only when the case has one). Every entry point validates eagerly and reports all
problems in one error, so a user fixes a dataset in one pass instead of one file per run.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from prod9_components.atomic import write_json
from prod9_components.data.geometry import check_case_geometry  # noqa: F401 (re-exported)
from prod9_components.data.modalities import MODALITIES, canonical_modality, modality_index
from prod9_components.data.provenance import check_resumed_splits

logger = logging.getLogger("prod9")

SPLITS = ("training", "validation", "test")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
EXPECTED_LAYOUT = (
    "<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz (BraTS 2018-2021) or "
    "<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz (BraTS 2023+), .nii or .nii.gz"
)
DEMO_NUM_CASES = 8
DEMO_DIR_PATTERN = os.path.join("~", ".cache", "prod9", "demo-v1-seed0-n{}")  # one folder per size
DEFAULT_DEMO_DIR = DEMO_DIR_PATTERN.format(DEMO_NUM_CASES)


def _strip_nifti_suffix(filename: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)]
    return None


def _file_role(filename: str) -> str | None:
    """'t1'/'t1ce'/'t2'/'flair'/'seg' from the token after the last '_' or '-' of a NIfTI name."""
    stem = _strip_nifti_suffix(filename)
    if stem is None:
        return None
    token = stem.replace("-", "_").rsplit("_", 1)[-1].lower()
    return "seg" if token == "seg" else canonical_modality(token)


def discover_cases(dataset_dir: str | os.PathLike) -> list[dict]:
    """List the BraTS cases of ``dataset_dir`` (one sub-directory per case), sorted by case name.

    Sub-directories without any NIfTI file and hidden ones (e.g. a half-written demo case) are not cases.

    Raises:
        FileNotFoundError: ``dataset_dir`` is missing or not a directory, or a case or volume is a broken link.
        ValueError: no case found, a file is ambiguous, or cases lack modalities (all listed at once).
    """
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {str(root)!r} does not exist or is not a directory")
    broken = sorted(str(p.relative_to(root)) for p in [*root.iterdir(), *root.glob("*/*")]
                    if p.is_symlink() and not p.exists() and not p.name.startswith("."))
    if broken:  # a case or a volume that points nowhere would otherwise be skipped or reported as missing
        raise FileNotFoundError(f"{root}: broken symbolic link(s): {', '.join(broken)}")
    cases, incomplete, duplicated = [], [], []
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in case_dir.iterdir() if f.is_file() and _strip_nifti_suffix(f.name))
        if not files:
            continue
        case: dict[str, str] = {"case": case_dir.name}
        for f in files:
            role = _file_role(f.name)
            if role is None:
                continue
            if role in case:
                duplicated.append(f"{case_dir.name}: {role} given by both {Path(case[role]).name} and {f.name}")
            case[role] = str(f.resolve())
        missing = [m for m in MODALITIES if m not in case]
        if missing:
            incomplete.append(f"{case_dir.name} (missing {', '.join(missing)})")
        cases.append(case)
    if duplicated:
        raise ValueError(f"{root}: ambiguous case files: " + "; ".join(duplicated))
    if incomplete:
        raise ValueError(f"{root}: {len(incomplete)} incomplete case(s): " + "; ".join(incomplete))
    if not cases:
        raise ValueError(f"{root}: no BraTS cases found; expected {EXPECTED_LAYOUT}")
    check_case_names({"training": cases}, root)
    return cases


def check_case_names(splits: Mapping[str, Sequence[Mapping]], source: str | os.PathLike) -> None:
    """Check every case name once, where datalists and folders are read: names become output file names
    (``<case>_T2.nii.gz``), so each must be a plain, non-empty file name, unique across all splits.

    Args:
        splits: split name -> items with a ``"case"`` key.
        source: the datalist file or dataset folder the names come from (named in the error).

    Raises:
        ValueError: one line naming ``source``, the split and the bad value.
    """
    seen: dict[str, str] = {}
    for split, items in splits.items():
        for item in items:
            name = item.get("case")
            if not isinstance(name, str) or not name:
                problem = "is empty or not a string"
            elif Path(name).is_absolute():
                problem = "is an absolute path"
            elif name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
                problem = "holds a path separator or is '.'/'..'"
            elif name in seen:
                problem = f"is used twice ({seen[name]} and {split})"
            else:
                seen[name] = split
                continue
            raise ValueError(f"{source}: case name {name!r} in {split} {problem}; expected a plain file name "
                             "(no '/', '\\' or '..'), unique across training, validation and test")


def _normalise_item(item: Mapping, dataset_dir: Path, where: str) -> dict:
    """Canonical keys (aliases -> t1/t1ce/t2/flair, 'label' -> 'seg') and absolute paths."""
    out: dict[str, str] = {}
    for key, value in item.items():
        role = "seg" if key.lower() in ("seg", "label") else canonical_modality(key)
        if role is None:
            out[key] = value
            continue
        path = Path(value).expanduser()
        out[role] = str(path if path.is_absolute() else (dataset_dir / path).resolve())
    missing = [m for m in MODALITIES if m not in out]
    if missing:
        raise ValueError(f"{where}: item {dict(item)} lacks modalities {missing}")
    out.setdefault("case", Path(out["t1"]).parent.name)  # checked with all names by check_case_names
    return out


def load_datalist(path: str | os.PathLike, dataset_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """Read a MONAI decathlon-style datalist ``{"training": [...], "validation": [...], "test": [...]}``.

    Items hold modality keys (aliases accepted) with paths relative to ``dataset_dir`` or absolute.
    Returns every split present (missing splits are empty lists) with canonical keys and absolute paths.

    Raises:
        FileNotFoundError: the datalist or any file it names is missing (all missing files listed).
        ValueError: the JSON is not a datalist.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"datalist {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(raw, dict) or not any(isinstance(raw.get(s), list) for s in SPLITS):
        raise ValueError(f"{path}: expected a JSON object with list(s) under {', '.join(SPLITS)}")
    root = Path(dataset_dir).expanduser()
    splits = {
        split: [_normalise_item(item, root, f"{path} [{split}][{i}]") for i, item in enumerate(raw.get(split) or [])]
        for split in SPLITS
    }
    check_case_names(splits, path)
    missing = [
        item[role]
        for items in splits.values()
        for item in items
        for role in (*MODALITIES, "seg")
        if role in item and not os.path.isfile(item[role])
    ]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} file(s) named in the datalist do not exist: {missing}")
    return splits


def save_datalist(splits: Mapping[str, Sequence[Mapping]], path: str | os.PathLike) -> str:
    """Write ``splits`` as a datalist JSON atomically (temp file + rename); returns the path."""
    path = Path(path).expanduser()
    write_json({k: list(v) for k, v in splits.items()}, path)
    return str(path)


def split_cases(
    cases: Sequence[Mapping], seed: int, val_fraction: float = 0.2, test_fraction: float = 0.1
) -> dict[str, list[dict]]:
    """Split cases into training/validation/test, deterministically from ``seed``.

    Each split gets ``round(n * fraction)`` cases but at least one; training keeps the rest.

    Raises:
        ValueError: fewer than 3 cases, or fractions that leave training empty.
    """
    n = len(cases)
    if n < 3:
        raise ValueError(f"need at least 3 cases to split into training/validation/test, got {n}")
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training case out of {n}"
        )
    # Shuffle a name-sorted copy so the split depends only on the seed and the set of cases.
    shuffled = sorted((dict(c) for c in cases), key=lambda c: c["case"])
    random.Random(seed).shuffle(shuffled)
    by_name = lambda items: sorted(items, key=lambda c: c["case"])  # noqa: E731
    return {
        "training": by_name(shuffled[n_val + n_test :]),
        "validation": by_name(shuffled[:n_val]),
        "test": by_name(shuffled[n_val : n_val + n_test]),
    }


def prepare_splits(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    seed: int = 0,
    datalist: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    resume: bool | str = False,
    **geometry,
) -> dict[str, list[dict]]:
    """Discover (or read ``datalist``), check geometry, split, and write ``<output_dir>/datalist.json``.

    A given datalist with a non-empty "validation" split is kept as it is; otherwise all its items are
    pooled and split from ``seed`` like discovered cases. With ``resume`` and a ``last.ckpt`` in ``output_dir``, the
    saved ``datalist.json`` is kept, and a different split raises (see :func:`provenance.check_resumed_splits`).
    ``geometry``: the run's ``spacing``, ``min_side`` and ``k_divisible`` for
    :func:`~prod9_components.data.geometry.check_case_geometry` (size checks before training).
    When the given datalist is that very file (a run's own record passed back in), it is left as it is, and a new
    split that would replace it is refused.
    """
    if datalist:
        given = load_datalist(datalist, dataset_dir)
        pooled = [item for split in SPLITS for item in given[split]]
    else:
        given, pooled = None, discover_cases(dataset_dir)
    check_case_geometry(pooled, **geometry)
    if given is not None and given["validation"]:
        splits = given
    else:
        splits = split_cases(pooled, seed, val_fraction, test_fraction)
    destination = Path(output_dir).expanduser() / "datalist.json"
    if datalist and destination.is_file() and os.path.samefile(Path(datalist).expanduser(), destination):
        if splits is not given:  # an input is never overwritten (DESIGN §10)
            raise ValueError(f"{datalist}: has no validation split, so it would be re-split and written over itself; "
                             "pass a datalist outside the output folder, or one with a validation split")
        return splits
    if not check_resumed_splits(output_dir, splits, resume):  # a resumed run keeps the record of its data
        save_datalist(splits, destination)
    return splits


def per_modality_items(
    cases: Iterable[Mapping], modalities: Sequence[str | int] = MODALITIES
) -> list[dict]:
    """One item per case x modality: ``{"image": path, "modality": index, "case": name[, "seg": path]}``."""
    indices = [modality_index(m) for m in modalities]
    items = []
    for case in cases:
        for index in indices:
            item = {"image": case[MODALITIES[index]], "modality": index, "case": case["case"]}
            if "seg" in case:
                item["seg"] = case["seg"]
            items.append(item)
    return items


def resolve_dataset_dir(dataset_dir: str | os.PathLike | None = None, demo_cases: int = DEMO_NUM_CASES) -> str:
    """Dataset directory to use: the argument, else ``$BRATS_DATA_DIR``, else the demo dataset of ``demo_cases``
    cases.

    The demo dataset is built on first use into ``$PROD9_DEMO_DIR`` (default ``~/.cache/prod9/demo-v1-seed0-n8``);
    one of another size into ``~/.cache/prod9/demo-v1-seed0-n<demo_cases>`` (``$PROD9_DEMO_DIR-n<demo_cases>`` when
    that is set): a folder holds one size, as every case in it is used.
    Logs one line saying which source is used.
    """
    if dataset_dir is not None and str(dataset_dir).strip():
        resolved = str(Path(dataset_dir).expanduser())
        logger.info("dataset: %s (given explicitly)", resolved)
        return resolved
    from_env = os.environ.get("BRATS_DATA_DIR", "").strip()
    if from_env:
        resolved = str(Path(from_env).expanduser())
        logger.info("dataset: %s (from BRATS_DATA_DIR)", resolved)
        return resolved
    from prod9_components.data.demo import make_demo_dataset  # heavy import (nilearn) only when needed

    given = os.environ.get("PROD9_DEMO_DIR", "").strip()
    folder = Path(given or DEFAULT_DEMO_DIR).expanduser()
    if demo_cases != DEMO_NUM_CASES and given:  # a sibling ("demo/" -> "demo-n40"), never a folder inside it
        folder = folder.resolve().with_name(f"{folder.resolve().name}-n{demo_cases}")
    elif demo_cases != DEMO_NUM_CASES:
        folder = Path(DEMO_DIR_PATTERN.format(demo_cases)).expanduser()
    demo_dir = str(folder)
    make_demo_dataset(demo_dir, num_cases=demo_cases, seed=0)
    logger.info("dataset: %s (demo dataset, %d synthetic cases; set BRATS_DATA_DIR to use real BraTS data)",
                demo_dir, demo_cases)
    return demo_dir
