"""One vocabulary for what a ControlNet reads, shared by both families (MaskGiT ``control_type``, MAISI
``condition_type``).

A value names the inputs of the trainable control branch, joined by ``+`` in the order of ``CONTROL_INPUTS``:

- ``mask``: the tumour segmentation (one-hot, at image resolution);
- ``image``: a source image of another modality of the same case (translation);
- ``label``: the target modality label.

The frozen base model always gets the target modality; ``label`` says whether the control branch gets it too.
Each family supports the values its architecture can build: MONAI's ``ControlNetMaisi`` always embeds the class
label, so every MAISI value includes ``label``; the MaskGiT branch has no image encoder.
"""

from __future__ import annotations

__all__ = ["CONTROL_INPUTS", "MAISI_CONTROL_TYPES", "MASKGIT_CONTROL_TYPES", "control_inputs", "parse_control_type"]

CONTROL_INPUTS = ("mask", "image", "label")
MASKGIT_CONTROL_TYPES = ("mask", "label", "mask+label")
MAISI_CONTROL_TYPES = ("label", "mask+label", "image+label", "mask+image+label")

# Retired spellings whose meaning differed between the families (``both`` was mask + label in MaskGiT, mask + image
# in MAISI) or that hid MAISI's always-on label: refused with the explicit value, never guessed.
_RETIRED = {
    "MaskGiT": {"both": "mask+label"},
    "MAISI": {"both": "mask+image+label", "all": "mask+image+label", "mask": "mask+label", "image": "image+label"},
}


def parse_control_type(value: str, family: str) -> str:
    """The canonical spelling of ``value`` for ``family`` ("MaskGiT" or "MAISI"); ``label+mask`` -> ``mask+label``.

    Raises a one-line ValueError naming the value and the family's supported values when the family cannot build it.
    """
    supported = {"MaskGiT": MASKGIT_CONTROL_TYPES, "MAISI": MAISI_CONTROL_TYPES}[family]
    choices = ", ".join(supported)
    text = str(value).strip().lower()
    if text in _RETIRED[family]:
        raise ValueError(f"control type {value!r} is no longer accepted by the {family} ControlNet: spell its inputs, "
                         f"{_RETIRED[family][text]!r} (supported: {choices})")
    parts = [p.strip() for p in text.split("+")]
    if not parts or any(p not in CONTROL_INPUTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"unknown control type {value!r}: join {', '.join(CONTROL_INPUTS)} with '+' "
                         f"(the {family} ControlNet supports {choices})")
    canonical = "+".join(p for p in CONTROL_INPUTS if p in parts)
    if canonical not in supported:
        raise ValueError(f"the {family} ControlNet cannot read control type {value!r} (supported: {choices})")
    return canonical


def control_inputs(control_type: str) -> frozenset[str]:
    """The inputs a canonical value names: ``"mask+label"`` -> {"mask", "label"}."""
    return frozenset(control_type.split("+"))
