"""A trained stage as a MONAI model-zoo bundle folder that runs on its own (with prod9_components installed).

Layout of the folder (the zoo's):

    configs/metadata.json    the stage's metadata, version and changelog of this export
    configs/inference.json   standalone: bundle_root, device, network_def, paths under @bundle_root (:mod:`.inference`)
    configs/logging.conf
    models/model.pt          this stage's state dict (what ``network_def`` loads)
    models/<upstream>.pt     stages 2-3: the networks it needs (autoencoder.pt / vae.pt; stage 3 also the frozen base it
                             controls, transformer.pt / diffusion.pt)
    large_files.yml          every file under models/ with its sha256; the URL is the publisher's to fill in
    docs/README.md           model card: the zoo template's sections, filled from the run (:mod:`.card`)
    docs/data_license.txt    what the weights were trained on, and whose terms apply
    LICENSE

:func:`export_bundle` writes it (:mod:`.folder`); every value taken from a checkpoint is written as data
(:func:`config_data`). The repository's own bundles carry the same ``configs/inference.json``, written by the same
builders from their train.json defaults (:mod:`.template`).
"""

from prod9_components.config_literals import config_data
from prod9_components.zoo.folder import export_bundle

__all__ = ["config_data", "export_bundle"]
