"""``prod9-train-maisi-vae``: MAISI stage 1, the KL-VAE (bundle ``maisi_stage1_vae``).

Verbs: ``train``, ``validate``, ``test``, ``infer``, ``export`` — the stage-1 verbs of ``prod9-train-autoencoder``
(:class:`~prod9_components.cli.autoencoder.StageOneCommands`) on the MAISI bundle. Any ``--<bundle id> value`` not
listed is passed to the bundle as an override (e.g. ``--epochs 5``, ``--network_def#num_splits 4``).
"""

from __future__ import annotations

from prod9_components.cli.autoencoder import StageOneCommands
from prod9_components.cli.bundle_runner import main_for

STAGE = "maisi_stage1_vae"


class MaisiVAECommands(StageOneCommands, stage=STAGE, title="MAISI stage-1 KL-VAE",
                       output_dir="outputs/maisi_stage1", export_path="<output_dir>/maisi_vae_final.pt"):
    """Train, evaluate and run the {title} (MONAI bundle ``{stage}``); its export feeds the stage-2 diffusion
    model."""


def main(argv: list[str] | None = None) -> None:
    main_for(MaisiVAECommands, argv)


if __name__ == "__main__":
    main()
