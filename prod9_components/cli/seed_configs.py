"""The config paths of the seed's workflow document, as names of our bundles.

The seed's commands pass ``--config configs/maskgit/brats/stage1/base.yaml`` and the like. We ship no such files:
each of those paths is a name for one of our bundles (``SEED_CONFIGS``), so the seed's commands run verbatim. A file
that really exists at that path (relative to the working directory) is the user's own preset and is read as one;
only when no such file exists does the name stand for the bundle. The bundle always comes from the installed package
(``bundles_root()``), never from the working directory.

A seed name also restores the seed's documented export paths (``outputs/brats_autoencoder-large.pt``,
``outputs/maisi_vae_final.pt``, relative to the working directory) where our bundles default to
``<output_dir>/<file>``: stage 1 writes its export there and stage 2 reads it from there. Stage 2 records the
export's sha256 in ``last.ckpt`` and refuses another file, so a shared export path cannot silently mix runs.
Flags (``--export-path``, ``--autoencoder-path``, ``--vae-path``) still win.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class SeedConfig(NamedTuple):
    """A seed config name: the bundle it stands for and the ids it sets unless a flag does."""

    stage: str
    defaults: dict


MASKGIT_EXPORT = "outputs/brats_autoencoder-large.pt"
MAISI_EXPORT = "outputs/maisi_vae_final.pt"

SEED_CONFIGS: dict[str, SeedConfig] = {
    "configs/maskgit/brats/stage1/base.yaml": SeedConfig("maskgit_stage1", {"export_path": MASKGIT_EXPORT}),
    "configs/maskgit/brats/stage2_label/base.yaml": SeedConfig("maskgit_stage2_label",
                                                               {"autoencoder_path": MASKGIT_EXPORT}),
    "configs/maskgit/brats/stage2/in_context.yaml": SeedConfig("maskgit_stage2_incontext",
                                                               {"autoencoder_path": MASKGIT_EXPORT}),
    # stage 3 reads the autoencoder path recorded in the stage-2 checkpoint; its transformer default is the seed's
    "configs/maskgit/brats/stage3/base.yaml": SeedConfig("maskgit_stage3_controlnet", {}),
    "configs/maisi/autoencoder/brats_vae.yaml": SeedConfig("maisi_stage1_vae", {"export_path": MAISI_EXPORT}),
    "configs/maisi/diffusion/brats_diffusion.yaml": SeedConfig("maisi_stage2_diffusion", {"vae_path": MAISI_EXPORT}),
    "configs/maisi/diffusion/brats_controlnet.yaml": SeedConfig("maisi_stage3_controlnet", {}),
}


def seed_config(config: str | None) -> SeedConfig | None:
    """The bundle a seed config name stands for, or None (no name of the table, or a real file/folder at that path:
    the user's own preset wins)."""
    if config is None or Path(config).exists():
        return None
    return SEED_CONFIGS.get(Path(config).as_posix().removeprefix("./"))
