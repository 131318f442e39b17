"""Segment-the-synthetic (DESIGN §9): a small tumour segmenter trained on the real images of a run's training split,
built on first use and cached on disk under a fingerprint of everything it depends on.

A generator that follows its tumour mask makes images in which a segmenter that only ever saw real images finds the
tumour where the mask put it. The evaluators of both ControlNets report the segmenter's Dice on each mask-controlled
sample against the conditioning mask beside its Dice on the real image of the same case and modality
(:mod:`prod9_components.metrics.tumour`): 1.0 for their ratio means the generated tumours are as recognisable as
real ones.

Choices:

- One network for every modality: the input is the image plus the modality as four constant one-hot channels, so a
  sample of any modality is segmented by the same weights. MONAI ``BasicUNet`` (a few hundred thousand parameters
  with the default features), one sigmoid channel for the whole tumour (``seg > 0``), MONAI ``DiceCELoss``.
- Training crops of ``roi_size`` voxels, half centred on tumour and half on brain (MONAI ``RandCropByPosNegLabeld``),
  through the run's own preprocessing (its spacing and intensity range), with a left-right flip and a mild gain and
  offset of the brain intensities: a sample a little darker or brighter overall than the real image is not
  penalised for it (intensities are judged by the other scores; this one asks where the tumour is).
- Inference by MONAI ``sliding_window_inference`` (Gaussian blending), so a 1 mm BraTS volume works as well as a
  4 mm demo volume.
- Cache: ``<cache_dir>/<fingerprint>/`` holds ``segmenter.pt`` (weights and constructor arguments; read with
  ``torch.load(weights_only=True)`` into the explicit class below, never a class the file names), ``metrics.json``
  (its Dice on the real test-split images) and ``segmenter.json`` (what it was made from), each written atomically,
  the record last. The fingerprint covers each case file (path, size, mtime), the spacing, the intensity range and
  every training setting, so any change trains a new segmenter in a new folder. Runs that share the cache (the
  demo's two ControlNets side by side) take turns on ``<fingerprint>.lock``: one trains, the others reuse its result.
- Training runs inside ``torch.random.fork_rng`` from its own seed: building (or reusing) the segmenter leaves the
  caller's random streams, and so its training run, exactly as they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from monai.transforms import Compose, FgBgToIndicesd, RandCropByPosNegLabeld
from tqdm import tqdm

from prod9_components.atomic import exclusive, write_json
from prod9_components.data.modalities import MODALITIES, MODALITY_NAMES
from prod9_components.data.transforms import preprocessing, preprocessing_contract
from prod9_components.engines.base_trainer import channels_last_on_cpu
from prod9_components.metrics.tumour import tumour_dice
from prod9_components.networks.export import atomic_save

__all__ = ["CachedTumourSegmenter", "TumourSegmenter", "segmenter_fingerprint", "segmenter_input",
           "train_tumour_segmenter"]

logger = logging.getLogger("prod9")

FORMAT = "prod9-tumour-segmenter"
VERSION = 1
DIVISOR = 16  # BasicUNet pools four times: every window side must divide by 2^4 ...
MIN_ROI = 32  # ... and keep 2 voxels at the bottom, where instance norm needs more than one


def segmenter_input(images: torch.Tensor, modalities: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """The network input: each image with its modality as constant one-hot channels.

    Args:
        images: (B, 1, D, H, W) preprocessed images.
        modalities: (B,) modality indices (T1=0, T1ce=1, T2=2, FLAIR=3).

    Returns:
        (B, 1 + 4, D, H, W) float32.
    """
    modalities = torch.as_tensor(modalities, device=images.device).long().reshape(-1)
    onehot = F.one_hot(modalities, len(MODALITIES)).float()[:, :, None, None, None]
    return torch.cat([images.float(), onehot.expand(-1, -1, *images.shape[2:])], dim=1)


def network_args(features: Sequence[int]) -> dict:
    """Constructor arguments of the segmenter's ``BasicUNet`` (JSON-able)."""
    return {"spatial_dims": 3, "in_channels": 1 + len(MODALITIES), "out_channels": 1,
            "features": [int(f) for f in features]}


class TumourSegmenter:
    """A trained whole-tumour segmenter and how to apply it.

    Args:
        network: the ``BasicUNet`` (input :func:`segmenter_input`, output one logit channel).
        roi_size: sliding-window size (each side a multiple of 16 and >= 32 for the ``BasicUNet``).
        intensity_range: (background, maximum) of the images it was trained on; the background pads small inputs.
        sw_batch_size: windows per network call.
        metrics: its own scores (``dice_test``, ...), as in its ``metrics.json``.
        folder: the cache folder it lives in (None: not cached).
    """

    def __init__(self, network: torch.nn.Module, roi_size: Sequence[int], intensity_range: Sequence[float] = (0.0, 1.0),
                 sw_batch_size: int = 4, metrics: Mapping | None = None, folder: str | os.PathLike | None = None):
        # channels-last on CPU: predicting 4 volumes of the demo (44 x 56 x 40) took 0.63 s against 0.78 s
        self.network = channels_last_on_cpu(network.eval(), next(network.parameters()).device)
        self.roi_size = [int(r) for r in roi_size]
        self.background = float(intensity_range[0])
        self.sw_batch_size = int(sw_batch_size)
        self.metrics = dict(metrics or {})
        self.folder = None if folder is None else Path(folder)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, modalities: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Whole-tumour masks of preprocessed images of any size.

        Args:
            images: (B, 1, D, H, W) in the training intensity range; modalities: (B,) their modality indices.

        Returns:
            (B, 1, D, H, W) bool, on ``images``' device.
        """
        device = next(self.network.parameters()).device
        shape = images.shape[2:]
        # Pad a small volume to one window with the background it was trained on (sliding_window_inference pads
        # with 0, which is not the background of a [-1, 1] range, and would also zero the modality channels).
        pad = [p for r, s in reversed(list(zip(self.roi_size, shape))) for p in (0, max(r - s, 0))]
        x = F.pad(images.float().to(device), pad, value=self.background)
        x = segmenter_input(x, modalities)
        logits = sliding_window_inference(x, self.roi_size, self.sw_batch_size, self.network, overlap=0.25,
                                          mode="gaussian")
        return (logits[:, :, : shape[0], : shape[1], : shape[2]] > 0).to(images.device)

    def dice(self, images: torch.Tensor, modalities: torch.Tensor | Sequence[int], seg: torch.Tensor) -> torch.Tensor:
        """(B,) Dice of the predicted tumour against ``seg > 0`` (NaN where ``seg`` has no tumour)."""
        return tumour_dice(self.predict(images, modalities), seg.to(images.device))


def _file_entry(path: str | os.PathLike) -> list:
    stat = os.stat(path)
    return [os.path.abspath(os.fspath(path)), stat.st_size, stat.st_mtime_ns]


def segmenter_fingerprint(training_cases: Sequence[Mapping], test_cases: Sequence[Mapping], spacing: Sequence[float],
                          intensity_range: Sequence[float], settings: Mapping) -> str:
    """First 16 hex digits of SHA-256 over everything a cached segmenter depends on: each case file (absolute path,
    size, mtime), the preprocessing contract (spacing, intensity range), the training settings and the format."""
    files = {split: [{key: _file_entry(case[key]) for key in (*MODALITIES, "seg")} for case in cases]
             for split, cases in (("training", training_cases), ("test", test_cases))}
    contract = {"files": files, "preprocessing": preprocessing_contract(spacing, tuple(intensity_range)),
                "settings": dict(settings), "format": FORMAT, "version": VERSION}
    return hashlib.sha256(json.dumps(contract, sort_keys=True).encode()).hexdigest()[:16]


def _preprocessed(cases: Sequence[Mapping], spacing: Sequence[float],
                  intensity_range: Sequence[float]) -> Iterator[dict]:
    """Each case through the run's preprocessing, one at a time: ``{"image": (4, D, H, W) float16 (T1, T1ce, T2,
    FLAIR), "seg": (1, D, H, W) uint8}`` (half the memory: the training cases are all held at once)."""
    transform = Compose(preprocessing(image_keys=MODALITIES, label_keys=["seg"], spacing=spacing,
                                      intensity_range=tuple(intensity_range), k_divisible=1))
    for case in cases:
        data = transform({key: case[key] for key in (*MODALITIES, "seg")})
        yield {"image": torch.cat([data[m].as_tensor() for m in MODALITIES]).half(),
               "seg": data["seg"].as_tensor().to(torch.uint8)}


def train_tumour_segmenter(volumes: Sequence[Mapping], steps: int, roi_size: Sequence[int],
                           features: Sequence[int], intensity_range: Sequence[float] = (0.0, 1.0),
                           batch_size: int = 2, learning_rate: float = 3e-3, seed: int = 0,
                           device: torch.device | str = "cpu", progress: bool = True) -> tuple[BasicUNet, float]:
    """Train a whole-tumour ``BasicUNet`` on random crops of preprocessed volumes, every modality in turn.

    Args:
        volumes: ``{"image": (4, D, H, W) modalities in T1, T1ce, T2, FLAIR order, "seg": (1, D, H, W) labels}``.
        steps: optimiser steps (Adam, ``learning_rate`` decayed to 0 on a cosine); batch_size: crops per step (each
            a random case and modality).
        roi_size: crop size, each side a multiple of 16 and >= 32.
        features: the ``BasicUNet`` features (six numbers).
        intensity_range: (background, maximum) of the images.
        seed: seeds the initialisation, the crops and the augmentation (the caller's random state is untouched).

    Returns:
        (the network in eval mode, the mean loss of the last tenth of the steps).
    """
    device = torch.device(device)
    low, high = (float(v) for v in intensity_range)
    # Pad every volume to at least one crop (images with the background, labels with 0), and find its tumour and
    # brain voxels once: the crop centres are drawn from these lists.
    prepared = []
    indices = FgBgToIndicesd("seg", image_key="image", image_threshold=low)
    for volume in volumes:
        pad = [p for r, s in reversed(list(zip(roi_size, volume["image"].shape[1:]))) for p in (0, max(r - s, 0))]
        data = {"image": F.pad(volume["image"], pad, value=low), "seg": F.pad(volume["seg"], pad, value=0)}
        prepared.append(indices(data))
    cropper = RandCropByPosNegLabeld(["image", "seg"], label_key="seg", spatial_size=tuple(roi_size), pos=1, neg=1,
                                     num_samples=1, fg_indices_key="seg_fg_indices", bg_indices_key="seg_bg_indices")
    cropper.set_random_state(seed=seed)
    generator = torch.Generator().manual_seed(seed)

    def uniform(a: float, b: float) -> float:
        return a + (b - a) * float(torch.rand((), generator=generator))

    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        # channels-last on CPU: a step of the demo's segmenter (2 crops of 32^3) took 0.137 s against 0.196 s
        network = channels_last_on_cpu(BasicUNet(**network_args(features)).to(device), device)
        optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
        # cosine decay to 0: the last steps polish instead of jumping around (a few hundred steps have no plateau)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(steps))
        loss_function = DiceCELoss(sigmoid=True, batch=True)
        losses = []
        network.train()
        for _ in tqdm(range(int(steps)), desc="tumour segmenter", unit="step", disable=not progress, leave=False,
                      mininterval=1.0):
            images, targets, modalities = [], [], []
            for _ in range(batch_size):
                case = prepared[int(torch.randint(len(prepared), (), generator=generator))]
                modality = int(torch.randint(len(MODALITIES), (), generator=generator))
                crop = cropper(case)[0]
                image = _plain(crop["image"])[modality : modality + 1].float()
                target = (_plain(crop["seg"]) > 0).float()
                brain = image > low
                gain, offset = uniform(0.9, 1.1), uniform(-0.05, 0.05) * (high - low)
                image = torch.where(brain, low + (image - low) * gain + offset, image)
                if uniform(0.0, 1.0) < 0.5:  # RAS axis 0 is left-right: a brain is roughly symmetric across it
                    image, target = image.flip(1), target.flip(1)
                images.append(image)
                targets.append(target)
                modalities.append(modality)
            x = segmenter_input(torch.stack(images).to(device), modalities)
            loss = loss_function(network(x), torch.stack(targets).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
    tail = losses[-max(1, len(losses) // 10):]
    return network.eval(), sum(tail) / len(tail)


def _plain(array) -> torch.Tensor:
    """A plain tensor of a crop (MONAI returns MetaTensors, whose metadata only slows the training step down)."""
    return array.as_tensor() if isinstance(array, MetaTensor) else torch.as_tensor(array)


def evaluate_segmenter(segmenter: TumourSegmenter, volumes: Iterable[Mapping]) -> dict:
    """Dice of ``segmenter`` on every modality of real preprocessed volumes against their ``seg > 0``.

    Returns:
        ``{"dice_test": mean over volumes with a tumour, "dice_test_<T1|T1ce|T2|FLAIR>": per modality,
        "num_test_volumes": volumes with a tumour}``; NaN means where no volume has a tumour.
    """
    per_modality = {name: [] for name in MODALITY_NAMES}
    for volume in volumes:
        images = volume["image"][:, None].float()  # (4, 1, D, H, W): one row per modality
        seg = volume["seg"][None].expand(len(MODALITIES), *volume["seg"].shape)
        for name, value in zip(MODALITY_NAMES, segmenter.dice(images, torch.arange(len(MODALITIES)), seg).tolist()):
            if not math.isnan(value):
                per_modality[name].append(value)
    values = [v for scores in per_modality.values() for v in scores]
    metrics = {"dice_test": sum(values) / len(values) if values else math.nan, "num_test_volumes": len(values)}
    metrics.update({f"dice_test_{name}": sum(s) / len(s) if s else math.nan for name, s in per_modality.items()})
    return metrics


def _json_number(value):
    """JSON has no NaN: write null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class CachedTumourSegmenter:
    """The run's tumour segmenter, trained on first use and cached; the evaluators call :meth:`predict`.

    Construction is cheap (it stats the case files for the fingerprint); the first :meth:`get` reuses
    ``<cache_dir>/<fingerprint>/`` when it holds a complete segmenter, else trains one on the first ``max_cases``
    training cases with a tumour mask, scores it on the real test-split images, and writes the folder.

    Args:
        cache_dir: root of the segmenter caches.
        training_cases / test_cases: case dicts of the run's splits (a path per modality and ``"seg"``); cases
            without ``"seg"`` are left out.
        spacing / intensity_range: the run's preprocessing.
        steps / roi_size / features / batch_size / learning_rate / seed: training settings
            (:func:`train_tumour_segmenter`).
        max_cases: training cases used at most (all of them are preprocessed into memory).
        sw_batch_size: windows per network call at inference.
        device: where it trains and predicts.

    Raises:
        ValueError: no training case has a tumour mask, or a ``roi_size`` side is not a multiple of 16.
    """

    def __init__(self, cache_dir: str | os.PathLike, training_cases: Sequence[Mapping], test_cases: Sequence[Mapping],
                 spacing: Sequence[float], intensity_range: Sequence[float] = (0.0, 1.0), steps: int = 500,
                 roi_size: Sequence[int] = (32, 32, 32), features: Sequence[int] = (8, 8, 16, 32, 64, 8),
                 batch_size: int = 2, learning_rate: float = 3e-3, seed: int = 0, max_cases: int = 16,
                 sw_batch_size: int = 4, device: torch.device | str = "cpu") -> None:
        roi_size = [int(r) for r in roi_size]
        if len(roi_size) != 3 or any(r < MIN_ROI or r % DIVISOR for r in roi_size):
            raise ValueError(f"segmenter roi_size must be 3 multiples of {DIVISOR}, each >= {MIN_ROI}, got {roi_size}")
        if int(steps) < 1:
            raise ValueError(f"segmenter steps must be >= 1, got {steps}")
        self.training_cases = [dict(c) for c in training_cases if "seg" in c][: int(max_cases)]
        self.test_cases = [dict(c) for c in test_cases if "seg" in c]
        if not self.training_cases:
            raise ValueError("the tumour segmenter needs training cases with a tumour mask (seg); none has one")
        self.spacing = [float(s) for s in spacing]
        self.intensity_range = [float(v) for v in intensity_range]
        self.settings = {"steps": int(steps), "roi_size": roi_size, "network": "BasicUNet",
                         "network_args": network_args(features), "batch_size": int(batch_size),
                         "learning_rate": float(learning_rate), "seed": int(seed), "max_cases": int(max_cases),
                         "loss": "DiceCELoss(sigmoid, batch)", "schedule": "cosine", "target": "seg > 0"}
        self.sw_batch_size = int(sw_batch_size)
        self.device = torch.device(device)
        self.fingerprint = segmenter_fingerprint(self.training_cases, self.test_cases, self.spacing,
                                                 self.intensity_range, self.settings)
        self.folder = Path(cache_dir).expanduser() / self.fingerprint
        self._segmenter: TumourSegmenter | None = None

    @property
    def metrics(self) -> dict:
        """The segmenter's own scores (builds it if needed)."""
        return self.get().metrics

    def predict(self, images: torch.Tensor, modalities: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """:meth:`TumourSegmenter.predict` of the cached segmenter."""
        return self.get().predict(images, modalities)

    def dice(self, images: torch.Tensor, modalities: torch.Tensor | Sequence[int], seg: torch.Tensor) -> torch.Tensor:
        """:meth:`TumourSegmenter.dice` of the cached segmenter."""
        return self.get().dice(images, modalities, seg)

    def get(self) -> TumourSegmenter:
        """The segmenter: from memory, from the cache folder, or trained now (and written there). Processes sharing
        the cache take turns (``<fingerprint>.lock`` beside the folder): the first trains it, the others then reuse
        it instead of training the same segmenter at the same time."""
        if self._segmenter is None:
            with exclusive(self.folder.with_name(self.folder.name + ".lock")):
                self._segmenter = self._load() or self._train()
        return self._segmenter

    def _wrap(self, network: torch.nn.Module, metrics: Mapping) -> TumourSegmenter:
        return TumourSegmenter(network.to(self.device), self.settings["roi_size"], self.intensity_range,
                               self.sw_batch_size, metrics, self.folder)

    def _load(self) -> TumourSegmenter | None:
        record_path = self.folder / "segmenter.json"
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text())
            if record.get("format") != FORMAT or record.get("fingerprint") != self.fingerprint:
                raise ValueError(f"its record is not a {FORMAT} of fingerprint {self.fingerprint}")
            weights = torch.load(self.folder / "segmenter.pt", map_location="cpu", weights_only=True)
            args = self.settings["network_args"]
            if not isinstance(weights, dict) or weights.get("network_args") != args:
                raise ValueError(f"its weights are not those of BasicUNet({args})")
            network = BasicUNet(**args)  # the explicit class: a cache file names no code
            network.load_state_dict(weights["state_dict"])
            metrics = json.loads((self.folder / "metrics.json").read_text())
        except Exception as error:  # truncated, foreign or edited files: train again rather than trust them
            reason = " ".join(str(error).split()) or type(error).__name__
            logger.warning(f"tumour segmenter {self.folder}: cannot reuse it ({reason}); training it again")
            return None
        logger.info(f"tumour segmenter: reusing {self.folder} (Dice {_format(metrics.get('dice_test'))} on "
                    f"{metrics.get('num_test_volumes', 0)} real test volume(s))")
        return self._wrap(network, metrics)

    def _train(self) -> TumourSegmenter:
        settings = self.settings
        args = settings["network_args"]
        logger.info(f"tumour segmenter: training BasicUNet (features {args['features']}) for {settings['steps']} "
                    f"steps on {len(self.training_cases)} training case(s) at {self.spacing} mm -> {self.folder}")
        start = time.perf_counter()
        volumes = list(_preprocessed(self.training_cases, self.spacing, self.intensity_range))
        network, final_loss = train_tumour_segmenter(
            volumes, settings["steps"], settings["roi_size"], args["features"], self.intensity_range,
            settings["batch_size"], settings["learning_rate"], settings["seed"], self.device)
        segmenter = self._wrap(network, {})
        metrics = evaluate_segmenter(segmenter, _preprocessed(self.test_cases, self.spacing, self.intensity_range))
        metrics.update(num_training_cases=len(volumes), num_test_cases=len(self.test_cases),
                       parameters=sum(p.numel() for p in network.parameters()), final_loss=final_loss,
                       seconds=round(time.perf_counter() - start, 1))
        segmenter.metrics = metrics
        atomic_save({"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "network_args": args,
                     "state_dict": {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}},
                    self.folder / "segmenter.pt")
        write_json({k: _json_number(v) for k, v in metrics.items()}, self.folder / "metrics.json")
        write_json({"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,  # last: marks it complete
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "preprocessing": preprocessing_contract(self.spacing, tuple(self.intensity_range)),
                    "settings": settings, "training_cases": [c.get("case") for c in self.training_cases],
                    "test_cases": [c.get("case") for c in self.test_cases]}, self.folder / "segmenter.json")
        logger.info(f"tumour segmenter: Dice {_format(metrics['dice_test'])} on {metrics['num_test_volumes']} real "
                    f"test volume(s), trained in {metrics['seconds']:.0f} s -> {self.folder}")
        return segmenter


def _format(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.3f}"
