"""Reseed every random source at the start of each training epoch, so a run resumed from ``last.ckpt`` continues
exactly as the uninterrupted run would have.

Without it a resumed run restarts the random streams from the run's seed: other crops, another shuffle, other noise.
With it, epoch ``e`` always starts from seed ``seed + e``: torch, numpy and Python's ``random`` (MONAI's
``set_determinism``), the random transforms of the training data, and a fresh data-loader iterator (whose shuffle
and worker seeds are drawn from torch's generator; Ignite otherwise keeps one iterator across epochs when
``epoch_length`` is shorter than the loader). A ``DistributedSampler`` is already seeded by its epoch.
"""

from __future__ import annotations

from ignite.engine import Engine, Events
from monai.utils import set_determinism


class EpochSeed:
    """Args:
        seed: the run's seed.
        transform: the training transforms (a MONAI ``Compose`` or any ``Randomizable``), or None.
    """

    def __init__(self, seed: int, transform=None) -> None:
        self.seed, self.transform = int(seed), transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        seed = self.seed + engine.state.epoch
        set_determinism(seed=seed)
        if self.transform is not None:
            self.transform.set_random_state(seed=seed)
        engine.set_data(engine.state.dataloader)  # a new iterator: shuffle and worker seeds from this epoch's seed
