"""BraTS modality names, their integer labels, and the tumour-label convention.

The modality index doubles as the class label of label-conditional models, so the order
here is part of every exported bundle: T1=0, T1ce=1, T2=2, FLAIR=3.
"""

from __future__ import annotations

import numpy as np
import torch

MODALITIES = ("t1", "t1ce", "t2", "flair")
MODALITY_NAMES = ("T1", "T1ce", "T2", "FLAIR")

# BraTS 2023+ file suffixes -> the 2018-2021 names used everywhere in prod9.
MODALITY_ALIASES = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}

# Tumour labels after mapping: 0 background, 1 necrotic core, 2 oedema, 3 enhancing.
# BraTS 2018-2021 store enhancing tumour as 4, BraTS 2023+ as 3.
TUMOUR_LABELS = (0, 1, 2, 3)
_BRATS_LABEL_MAP = {0: 0, 1: 1, 2: 2, 3: 3, 4: 3}


def canonical_modality(name: str) -> str | None:
    """Canonical lower-case modality key for a name or alias (case-insensitive); None if unknown."""
    key = name.strip().lower()
    key = MODALITY_ALIASES.get(key, key)
    return key if key in MODALITIES else None


def modality_index(name_or_index: str | int) -> int:
    """Integer label (0-3) of a modality given by name, alias or index.

    Raises:
        ValueError: for an unknown name or an index outside 0-3.
    """
    if isinstance(name_or_index, (int, np.integer)) and not isinstance(name_or_index, bool):
        if 0 <= int(name_or_index) < len(MODALITIES):
            return int(name_or_index)
    elif isinstance(name_or_index, str):
        key = canonical_modality(name_or_index)
        if key is not None:
            return MODALITIES.index(key)
    raise ValueError(
        f"unknown modality {name_or_index!r}; valid: {', '.join(MODALITY_NAMES)} "
        f"(aliases {', '.join(MODALITY_ALIASES)})"
    )


def modality_name(index: str | int) -> str:
    """Display name ("T1", "T1ce", "T2", "FLAIR") of a modality index or name."""
    return MODALITY_NAMES[modality_index(index)]


def map_brats_labels(seg: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Map BraTS tumour labels {0,1,2,3,4} to {0,1,2,3} (4 -> 3), keeping type, shape and dtype.

    Raises:
        ValueError: naming every label value outside {0, 1, 2, 3, 4}.
    """
    values = torch.unique(seg).tolist() if isinstance(seg, torch.Tensor) else np.unique(seg).tolist()
    # Labels resampled as floats (nearest neighbour) still print as the integers they are.
    unexpected = [int(v) if float(v).is_integer() else v for v in values if v not in _BRATS_LABEL_MAP]
    if unexpected:
        raise ValueError(
            f"unexpected tumour label values {unexpected}; expected a subset of {sorted(_BRATS_LABEL_MAP)}"
        )
    if isinstance(seg, torch.Tensor):
        return torch.where(seg == 4, torch.full_like(seg, 3), seg)
    return np.where(seg == 4, np.asarray(3, dtype=seg.dtype), seg).astype(seg.dtype, copy=False)
