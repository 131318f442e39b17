#!/usr/bin/env python
"""Speed and memory of each stage, printed as one JSON object per measurement.

    python scripts/benchmark.py stage1|stage2|maisi|variants|demo|all [--device cpu|cuda] [--repeats N]
                                [--network small|default] [--output benchmarks/results.json] [--bundles B ...]

``all`` also writes ``benchmarks/results.json`` (the machine, the command and every row) and the markdown table
``benchmarks/results.md`` beside it (``--output`` picks another path; any stage can write one).

Every measurement has: name, device, seconds (median of `repeats`), repeats, gflop (counted with torch's FLOP
counter, taught the CPU's attention kernel: :func:`flop_counter`), gflops_per_s, matmul_peak_gflops (a float32 matmul
measured in the same run), peak_fraction (gflops_per_s / matmul_peak_gflops), peak_mem_mb (CUDA: max allocated; CPU:
peak RSS of a fresh process that ran only this measurement), and baseline_seconds + ratio where a MONAI reference of
the same work exists. Each measurement runs in its own spawned process so peak memory is its own. Timings are never
test assertions; they live here.

Stages: ``stage1`` FSQ autoencoder (GAN train step, sliding-window encode/decode); ``stage2`` MaskGiT transformer
(train step, sampling at 8/12/16 steps); ``maisi`` MAISI KL-VAE GAN train step, rectified-flow diffusion train step
(vs MONAI ``DiffusionModelUNet``), generation at 10 and 30 steps including the tiled VAE decode, and the network-call
and time ratio of the 10-step rectified-flow sampler vs a 1000-step MONAI DDPM loop on the same UNet; ``variants``
both stage-2 training steps (MaskGiT transformer, MAISI UNet) in float32, bfloat16 autocast and ``torch.compile``
(bfloat16 on CUDA only), each against float32 eager; ``all`` includes them on CUDA only (compiling takes minutes on
a CPU: measured there, on 2 cores, torch.compile gave the transformer step no gain after 79 s of compiling);
``demo`` the real training iteration (``train#trainer._iteration``) of each of the seven bundles as
``scripts/demo.py`` trains it (train.json + tiny.json + the demo's flags, read at run time; the demo dataset), on
batches of the bundle's own data loader, with the loader's time per batch beside it (``data_seconds``);
``--bundles`` picks some. Stages 2 and 3 get untrained upstream checkpoints, written into a temporary folder.

Every training-step row times a trainer's real ``_iteration``, built from its bundle's ``train.json`` (its network,
loss, optimizer, schedule and AMP setting; :func:`bundle_trainer`), never a hand-written copy of the step: the
full-size rows on synthetic batches at the ``--network`` size, the demo rows on the demo's data.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

# CPU runs use a small network so a 240x240x155 sliding-window pass takes seconds, not hours; CUDA runs use the
# bundle's default (train.json) network. The MAISI VAE (4x, 4 latent channels) uses the same table.
NETWORKS = {
    "small": {"num_channels": [16, 32, 64], "num_res_blocks": [1, 1, 1], "norm_num_groups": 8},
    "default": {"num_channels": [64, 128, 256], "num_res_blocks": [2, 2, 2], "norm_num_groups": 32},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flop_counter():
    """torch's FLOP counter, taught the CPU's fused attention kernel: torch counts the CUDA attention kernels but not
    ``_scaled_dot_product_flash_attention_for_cpu`` (forward or backward), so a CPU transformer step would count only
    its linear layers. The CPU kernel does the same matmuls, so it gets torch's own attention formulas."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:  # arguments arrive as shapes
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, GFLOP of one call). The FLOP-counting call doubles as the warm-up."""
    with flop_counter() as counter:
        fn()
    return median_seconds(fn, device, repeats), counter.get_total_flops() / 1e9


def matmul_peak_gflops(device: torch.device, repeats: int = 5) -> float:
    """A square matmul's GFLOP/s: float32 on CPU; on CUDA bfloat16 (the steps run under autocast there) and large
    enough to fill the GPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    seconds = median_seconds(lambda: a @ b, device, repeats)
    return 2 * n**3 / seconds / 1e9


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def result(name: str, device: torch.device, seconds: float, repeats: int, gflop: float | None, peak: float,
           baseline_seconds: float | None = None, **extra) -> dict:
    matmul_peak = matmul_peak_gflops(device)
    row = {"name": name, "device": device.type, "seconds": round(seconds, 5), "repeats": repeats,
           "gflop": None if gflop is None else round(gflop, 3),
           "gflops_per_s": None if gflop is None else round(gflop / seconds, 2),
           "matmul_peak_gflops": round(matmul_peak, 1),
           "peak_fraction": None if gflop is None else round(gflop / seconds / matmul_peak, 3),
           "peak_mem_mb": round(peak, 1)}
    if baseline_seconds is not None:
        row.update(baseline_seconds=round(baseline_seconds, 5), ratio=round(seconds / baseline_seconds, 3))
    row.update(extra)
    return row


BUNDLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles")


def bundle_trainer(bundle: str, device: torch.device, overrides: dict | None = None):
    """``train#trainer`` of ``bundles/<bundle>/configs/train.json``: the bundle's own trainer, network, loss, optimizer
    and AMP setting (on CUDA), whose real ``_iteration`` a row times on synthetic batches. ``overrides`` set the
    network size and stand in for what train.json would read from data or an upstream export; no data loader and no
    handlers are built (the batches are passed in). Returns ``(parser, trainer)``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLES, bundle, "configs", "train.json"))
    parser.update({"device": f"$torch.device('{device}')", "amp": device.type == "cuda",
                   "train#trainer#train_data_loader": "$[]", "train#trainer#epoch_length": 1,
                   "train#trainer#train_handlers": [], **(overrides or {})})
    return parser, parser.get_parsed_content("train#trainer")


def iteration(trainer, batch: dict) -> Callable[[], None]:
    """One call of the trainer's real training iteration on ``batch``."""
    return lambda: trainer._iteration(trainer, batch)


LEVELS = [8, 8, 8, 6, 5]  # the bundles' default FSQ levels: 15,360 codes


def sized(network: dict) -> dict:
    """``network_def#<arg>`` overrides of a bundle's network constructor arguments."""
    return {f"network_def#{k}": v for k, v in network.items()}


def autoencoder(device: torch.device, size: str):
    from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ

    return AutoencoderFSQ(levels=LEVELS, **NETWORKS[size]).to(device)


# --- stage 1 measurements (each a function of device, repeats, size) -------------------------------------------


def stage1_train_step(device: torch.device, repeats: int, size: str) -> dict:
    """One ``AutoencoderGANTrainer`` iteration of the maskgit_stage1 bundle (generator step, then discriminator step;
    timed past ``disc_start``) on a 64^3 crop, batch 2."""
    torch.manual_seed(0)
    _, trainer = bundle_trainer("maskgit_stage1", device, sized(NETWORKS[size]))
    trainer.state.iteration = trainer.loss_function.disc_start  # adversarial loss and discriminator step included
    seconds, gflop = measure(iteration(trainer, {"image": torch.rand(2, 1, 64, 64, 64)}), device, repeats)
    return result("stage1_train_step", device, seconds, repeats, gflop, peak_mem_mb(device),
                  network=size, batch=2, roi=[64, 64, 64], volumes_per_s=round(2 / seconds, 3))


def stage1_sliding_window(device: torch.device, repeats: int, size: str) -> dict:
    """Sliding-window encode + decode of a 240x240x155 volume (ROI 64, gaussian) vs MONAI's
    ``SlidingWindowInferer`` running the whole autoencoder per window (the same work in one tiled pass)."""
    from monai.inferers import SlidingWindowInferer

    from prod9_components.inference.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig

    torch.manual_seed(0)
    network = autoencoder(device, size).eval()
    volume = torch.rand(1, 1, 240, 240, 155, device=device)
    # A CPU pass at overlap 0.5 takes minutes per repeat (196 windows); 0.25 (75 windows) keeps it shorter.
    overlap = 0.5 if device.type == "cuda" else 0.25
    config = SlidingWindowConfig(roi_size=(64, 64, 64), overlap=overlap, sw_batch_size=4)  # the bundles' default
    wrapper = AutoencoderInferenceWrapper(network, config)
    baseline = SlidingWindowInferer(roi_size=(64, 64, 64), overlap=overlap, sw_batch_size=config.sw_batch_size,
                                    mode="gaussian")

    def ours():
        with torch.no_grad():
            wrapper.decode(wrapper.encode(volume))

    def monai_reference():
        with torch.no_grad():
            baseline(volume, lambda x: network(x)[0])

    seconds, gflop = measure(ours, device, repeats)
    baseline_seconds = median_seconds(monai_reference, device, repeats)
    return result("stage1_sliding_window_encode_decode_240x240x155", device, seconds, repeats, gflop,
                  peak_mem_mb(device), baseline_seconds, network=size, roi=[64, 64, 64], overlap=overlap,
                  baseline="monai SlidingWindowInferer(network forward)")


# --- stage 2 measurements ------------------------------------------------------------------------------------

TRANSFORMERS = {
    "small": ({"hidden_dim": 128, "num_layers": 4, "num_heads": 4}, (8, 8, 8)),
    "default": ({"hidden_dim": 512, "num_layers": 12, "num_heads": 8}, (16, 16, 16)),
}


def transformer(device: torch.device, size: str):
    from prod9_components.networks.maskgit_transformer import TransformerDecoderSingleStream

    args, grid = TRANSFORMERS[size]
    return TransformerDecoderSingleStream(codebook_size=15360, code_levels=LEVELS, max_grid_size=grid,
                                          **args).to(device), grid


def _context(grid, with_context: bool, device: torch.device, batch: int):
    if not with_context:
        return None, None
    return (torch.randint(15360, (batch, 1, *grid), device=device), torch.zeros(batch, 1, dtype=torch.long,
                                                                                  device=device))


def transformer_trainer(device: torch.device, size: str, with_context: bool, overrides: dict | None = None):
    """``(trainer, batch)``: the MaskGiT trainer of maskgit_stage2_label (no context), or of
    maskgit_stage2_incontext with one source modality (T1 -> T2), and a batch of 4 random token volumes."""
    args, grid = TRANSFORMERS[size]
    bundle = "maskgit_stage2_incontext" if with_context else "maskgit_stage2_label"
    context = {"source_modalities": ["T1"], "target_modality": "T2"} if with_context else {}
    _, trainer = bundle_trainer(bundle, device, {**sized({**args, "codebook_size": 15360, "code_levels": LEVELS,
                                                                "max_grid_size": list(grid)}),
                                                 **context, **(overrides or {})})
    return trainer, {"tokens": torch.randint(15360, (4, 4, *grid))}


def stage2_train_step(device: torch.device, repeats: int, size: str) -> list[dict]:
    """One ``MaskGiTTrainer`` iteration (batch 4) of the label bundle (no context) and of the in-context bundle with
    one source modality."""
    torch.manual_seed(0)
    rows = []
    for with_context in (False, True):
        trainer, batch = transformer_trainer(device, size, with_context)
        grid = TRANSFORMERS[size][1]
        seconds, gflop = measure(iteration(trainer, batch), device, repeats)
        rows.append(result(f"stage2_train_step_{'with' if with_context else 'without'}_context", device, seconds,
                           repeats, gflop, peak_mem_mb(device), network=size, token_grid=list(grid), batch=4,
                           sequence_length=(2 if with_context else 1) * math.prod(grid) + 1))
    return rows


def stage2_sampling(device: torch.device, repeats: int, size: str) -> list[dict]:
    """Sampling one token volume at 8, 12 and 16 MaskGiT steps, without and with one source modality."""
    from prod9_components.sampling.maskgit import MaskGiTSampler

    torch.manual_seed(0)
    network, grid = transformer(device, size)
    rows = []
    for with_context in (False, True):
        sources, labels = _context(grid, with_context, device, 1)
        for steps in (8, 12, 16):
            sampler = MaskGiTSampler(num_steps=steps)

            def sample():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    sampler.sample(network, (1, *grid), torch.tensor([2], device=device), sources, labels,
                                   generator=torch.Generator().manual_seed(0))

            seconds, gflop = measure(sample, device, repeats)
            rows.append(result(f"stage2_sampling_{steps}_steps_{'with' if with_context else 'without'}_context",
                               device, seconds, repeats, gflop, peak_mem_mb(device), network=size,
                               token_grid=list(grid), num_steps=steps, volumes_per_s=round(1 / seconds, 3)))
    return rows


# --- MAISI measurements ----------------------------------------------------------------------------------------

# (MaisiDiffusionUNet arguments, latent grid (d, h, w), VAE sliding-window ROI). "default" is the bundle's network
# on a 1 mm BraTS brain crop (192x192x160) at 4x; every grid is a multiple of the UNet's downsample factor.
MAISI_UNETS = {
    "small": ({"num_channels": [32, 64, 64], "num_res_blocks": [1, 1, 1], "attention_levels": [False, False, True],
               "norm_num_groups": 8, "num_head_channels": 8}, (16, 16, 16), 32),
    "default": ({"num_channels": [64, 128, 256, 256], "num_res_blocks": [2, 2, 2, 2],
                 "attention_levels": [False, False, True, True], "norm_num_groups": 32, "num_head_channels": 32},
                (48, 48, 40), 64),
}
DDPM_TIMED_STEPS = 5  # DDPM steps actually run; the 1000-step time is extrapolated from their per-call time


def maisi_vae(device: torch.device, size: str):
    from prod9_components.networks.maisi_vae import MaisiVAE

    return MaisiVAE(latent_channels=4, use_flash_attention=device.type == "cuda", **NETWORKS[size]).to(device)


def maisi_unet(device: torch.device, size: str):
    """(MaisiDiffusionUNet on 4 latent channels, latent grid (d, h, w))."""
    from prod9_components.networks.maisi_diffusion import MaisiDiffusionUNet

    args, latent_size, _ = MAISI_UNETS[size]
    network = MaisiDiffusionUNet(latent_channels=4, use_flash_attention=device.type == "cuda", **args)
    return network.to(device), latent_size


def rflow_scheduler():
    """The bundle's scheduler: continuous timesteps, resolution-shifted (base 32^3 latent voxels)."""
    from monai.networks.schedulers import RFlowScheduler

    return RFlowScheduler(1000, use_discrete_timesteps=False, use_timestep_transform=True,
                          base_img_size_numel=32768, spatial_dim=3)


class CallCounter(torch.nn.Module):
    """Forwards to ``network`` and counts the calls (``calls``)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network, self.calls = network, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.network(*args, **kwargs)


def maisi_vae_train_step(device: torch.device, repeats: int, size: str) -> dict:
    """One ``AutoencoderGANTrainer`` iteration of the maisi_stage1_vae bundle (generator step with L1 +
    focal-frequency + adaptive adversarial + KL loss, then discriminator step; timed past ``disc_start``; AMP +
    GradScaler on CUDA) on a 64^3 crop, batch 2: image (2, 1, 64, 64, 64) -> latent (2, 4, 16, 16, 16)."""
    torch.manual_seed(0)
    _, trainer = bundle_trainer("maisi_stage1_vae", device, sized(NETWORKS[size]))
    trainer.state.iteration = trainer.loss_function.disc_start  # adversarial loss and discriminator step included
    seconds, gflop = measure(iteration(trainer, {"image": torch.rand(2, 1, 64, 64, 64)}), device, repeats)
    return result("maisi_vae_train_step", device, seconds, repeats, gflop, peak_mem_mb(device), network=size,
                  batch=2, roi=[64, 64, 64], latent_channels=4, amp="float16" if trainer.amp else None,
                  volumes_per_s=round(2 / seconds, 3))


def unet_trainer(device: torch.device, size: str, network: torch.nn.Module | None = None,
                 overrides: dict | None = None):
    """``(trainer, batch)``: the ``RectifiedFlowTrainer`` of maisi_stage2_diffusion (its scheduler, EMA, label dropout,
    grad clip, AdamW; bfloat16 autocast on CUDA) and a batch of latents (2, 4, d, h, w) with labels (2,).
    ``network``: train this module instead of the bundle's UNet (the MONAI baseline)."""
    args, latent_size, _ = MAISI_UNETS[size]
    network_args = sized({**args, "use_flash_attention": device.type == "cuda"})
    _, trainer = bundle_trainer("maisi_stage2_diffusion", device,
                                {**network_args, **({"network_def": network} if network is not None else {}),
                                 **(overrides or {})})
    return trainer, {"latent": torch.randn(2, 4, *latent_size), "label": torch.tensor([0, 2])}


def maisi_diffusion_train_step(device: torch.device, repeats: int, size: str) -> dict:
    """One ``RectifiedFlowTrainer`` iteration of the maisi_stage2_diffusion bundle on latents (2, 4, d, h, w) with
    labels (2,), vs the same trainer training MONAI's ``DiffusionModelUNet`` of the same channels, residual blocks,
    attention, heads and 5 class embeddings."""
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    trainer, batch = unet_trainer(device, size)
    network = trainer.network
    seconds, gflop = measure(iteration(trainer, batch), device, repeats)
    peak = peak_mem_mb(device)  # before the baseline network exists
    args = MAISI_UNETS[size][0]
    baseline = DiffusionModelUNet(
        spatial_dims=3, in_channels=4, out_channels=4, num_res_blocks=args["num_res_blocks"],
        channels=args["num_channels"], attention_levels=args["attention_levels"],
        norm_num_groups=args["norm_num_groups"], num_head_channels=args["num_head_channels"],
        num_class_embeds=network.null_label + 1, include_fc=False, use_flash_attention=device.type == "cuda",
    )
    baseline.null_label = network.null_label  # the trainer's label dropout reads it
    baseline_trainer, _ = unet_trainer(device, size, network=baseline)
    iteration(baseline_trainer, batch)()  # warm-up
    baseline_seconds = median_seconds(iteration(baseline_trainer, batch), device, repeats)
    return result("maisi_diffusion_train_step", device, seconds, repeats, gflop, peak, baseline_seconds,
                  network=size, batch=2, latent_size=list(MAISI_UNETS[size][1]),
                  amp="bfloat16" if trainer.amp else None,
                  parameters_m=round(sum(p.numel() for p in network.parameters()) / 1e6, 2),
                  baseline="the same RectifiedFlowTrainer iteration on monai DiffusionModelUNet (same channels/res "
                           "blocks/attention/heads, 5 class embeds)")


def maisi_generation(device: torch.device, repeats: int, size: str) -> list[dict]:
    """One T2 volume per call: noise (1, 4, d, h, w) -> 10 or 30 Euler steps (guidance 1) -> sliding-window VAE
    decode (ROI 64, small: 32; overlap 0.5) -> image (1, 4d, 4h, 4w); bfloat16 autocast on CUDA (as stage 2).
    ``decode_seconds`` is the decode alone."""
    from prod9_components.generation.decode import decode_latent
    from prod9_components.generation.maisi import sample_volumes
    from prod9_components.inference.sliding_window import SlidingWindowConfig

    torch.manual_seed(0)
    network, latent_size = maisi_unet(device, size)
    network.eval()
    vae = maisi_vae(device, size).eval()
    scheduler = rflow_scheduler()
    roi = MAISI_UNETS[size][2]
    config = SlidingWindowConfig(roi_size=roi, overlap=0.5, sw_batch_size=4)  # the bundles' default
    amp = {"device_type": "cuda", "dtype": torch.bfloat16, "enabled": device.type == "cuda"}

    def decode():
        with torch.autocast(**amp):
            decode_latent(vae, torch.randn(1, 4, *latent_size, device=device), 1.0, config)

    decode()  # warm-up
    decode_seconds = median_seconds(decode, device, repeats)
    rows = []
    for steps in (10, 30):

        def generate():
            with torch.autocast(**amp):
                list(sample_volumes(network, vae, scheduler, "T2", 1, latent_size, scale_factor=1.0, num_steps=steps,
                                    guidance_scale=1.0, sw_config=config, device=device))

        seconds, gflop = measure(generate, device, repeats)
        rows.append(result(f"maisi_generation_{steps}_steps", device, seconds, repeats, gflop, peak_mem_mb(device),
                           network=size, latent_size=list(latent_size),
                           image_size=[vae.downsample_factor * n for n in latent_size], num_steps=steps,
                           sw_roi=roi, sw_overlap=0.5, decode_seconds=round(decode_seconds, 5),
                           amp="bfloat16" if device.type == "cuda" else None, volumes_per_s=round(1 / seconds, 3)))
    return rows


def maisi_ddpm_call_ratio(device: torch.device, repeats: int, size: str) -> dict:
    """Network calls and time of our 10-step rectified-flow sampler vs a 1000-step MONAI ``DDPMScheduler`` loop on the
    same UNet, one latent (1, 4, d, h, w). ``seconds`` is the 10-step sampler; the DDPM time is extrapolated from
    ``DDPM_TIMED_STEPS`` steps actually run (per-call time x 1000), not a full 1000-step run."""
    from monai.networks.schedulers import DDPMScheduler

    from prod9_components.sampling.rectified_flow import sample_rectified_flow

    torch.manual_seed(0)
    unet, latent_size = maisi_unet(device, size)
    network = CallCounter(unet.eval())
    scheduler, ddpm = rflow_scheduler(), DDPMScheduler(1000)
    ddpm.set_timesteps(1000)
    noise = torch.randn(1, 4, *latent_size, device=device)
    labels = torch.tensor([2], device=device)
    amp = {"device_type": "cuda", "dtype": torch.bfloat16, "enabled": device.type == "cuda"}

    def rflow():
        with torch.autocast(**amp):
            sample_rectified_flow(network, scheduler, noise, labels, 10, 1.0, unet.null_label)

    @torch.no_grad()
    def ddpm_prefix():
        x = noise
        with torch.autocast(**amp):
            for t in ddpm.timesteps[:DDPM_TIMED_STEPS]:
                x, _ = ddpm.step(network(x, t.reshape(1).to(device), class_labels=labels).float(), int(t), x)

    def calls(fn: Callable[[], None]) -> int:
        network.calls = 0
        fn()  # doubles as a warm-up
        return network.calls

    rflow_calls = calls(rflow)
    ddpm_calls = len(ddpm.timesteps) * calls(ddpm_prefix) // DDPM_TIMED_STEPS
    seconds, gflop = measure(rflow, device, repeats)
    per_call = median_seconds(ddpm_prefix, device, repeats) / DDPM_TIMED_STEPS
    ddpm_seconds = per_call * ddpm_calls
    return result("maisi_ddpm_call_ratio", device, seconds, repeats, gflop, peak_mem_mb(device), network=size,
                  latent_size=list(latent_size), amp="bfloat16" if device.type == "cuda" else None, rflow_steps=10,
                  rflow_calls=rflow_calls, ddpm_steps=len(ddpm.timesteps), ddpm_calls=ddpm_calls,
                  call_ratio=round(ddpm_calls / rflow_calls, 2), rflow_seconds=round(seconds, 5),
                  ddpm_timed_steps=DDPM_TIMED_STEPS, ddpm_seconds_per_call=round(per_call, 5),
                  ddpm_seconds_extrapolated=round(ddpm_seconds, 3), seconds_ratio=round(ddpm_seconds / seconds, 2),
                  note=f"ddpm_seconds_extrapolated = median time of {DDPM_TIMED_STEPS} DDPM steps / "
                       f"{DDPM_TIMED_STEPS} x ddpm_calls; the 1000-step loop is not run")


# --- precision and compilation variants --------------------------------------------------------------------------

# bfloat16 only on CUDA: on CPUs without bfloat16 matrix units it is hundreds of times slower than float32.
VARIANTS = {"cuda": ("float32", "bfloat16", "compile+bfloat16"), "cpu": ("float32", "compile")}


def variant_rows(name: str, build: Callable[[bool, bool], Callable[[], None]], device: torch.device, repeats: int,
                 **extra) -> list[dict]:
    """Time the training step ``build(bfloat16, compiled)`` makes under each of this device's ``VARIANTS``.

    Every variant builds its own network; ratios are against float32 eager (the first), whose FLOP count every row
    carries (the same math). ``first_call_seconds`` is the warm-up call, which includes ``torch.compile``.
    """
    rows: list[dict] = []
    eager_seconds = gflop = None
    for variant in VARIANTS[device.type]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = build("bfloat16" in variant, variant.startswith("compile"))
        first = None
        if gflop is None:
            eager_seconds, gflop = measure(step, device, repeats)
            seconds = eager_seconds
        else:
            start = time.perf_counter()
            step()
            sync(device)
            first = round(time.perf_counter() - start, 2)
            seconds = median_seconds(step, device, repeats)
        reference = None if variant == "float32" else eager_seconds
        rows.append(result(f"{name}_{variant}", device, seconds, repeats, gflop, peak_mem_mb(device), reference,
                           variant=variant, first_call_seconds=first,
                           baseline=None if reference is None else "float32 eager, same step", **extra))
    return rows


def train_step_variants(device: torch.device, repeats: int, size: str) -> list[dict]:
    """The two stage-2 trainers' iterations - MaskGiT transformer (batch 4, label mode) and MAISI rectified-flow UNet
    (batch 2) - in float32, bfloat16 autocast (the trainer's ``amp``) and ``torch.compile`` of the trainer's network
    (CUDA: compile + bfloat16)."""

    def compiled_step(trainer, batch, compiled: bool) -> Callable[[], None]:
        if compiled:  # the optimizer keeps the same parameters; unwrap() sees through the compile wrapper
            trainer.network = torch.compile(trainer.network)
        return iteration(trainer, batch)

    def transformer_step(bfloat16: bool, compiled: bool) -> Callable[[], None]:
        torch.manual_seed(0)
        return compiled_step(*transformer_trainer(device, size, False, {"amp": bfloat16}), compiled)

    def unet_step(bfloat16: bool, compiled: bool) -> Callable[[], None]:
        torch.manual_seed(0)
        return compiled_step(*unet_trainer(device, size, overrides={"amp": bfloat16}), compiled)

    return (variant_rows("stage2_train_step", transformer_step, device, repeats, network=size, batch=4)
            + variant_rows("maisi_diffusion_train_step", unet_step, device, repeats, network=size, batch=2))


# --- the demo's own training engines --------------------------------------------------------------------------

DEMO_WARMUP = 2  # iterations run before timing (first-call allocations, lazy caches)
DEMO_STEPS = 5  # timed iterations at least (median)


def demo_module():
    """``scripts/demo.py``, loaded from its file: its ``STAGES`` and ``train_command`` say what the demo trains."""
    import importlib.util

    if "prod9_demo" not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
        spec = importlib.util.spec_from_file_location("prod9_demo", path)
        sys.modules["prod9_demo"] = module = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(module)
    return sys.modules["prod9_demo"]


def demo_stage(bundle: str):
    return next(s for s in demo_module().STAGES if s.name == bundle)


class _Captured(BaseException):  # not an Exception: the console script's one-line error handler lets it through
    pass


def demo_train_config(bundle: str, workdir: str) -> tuple[list[str], dict]:
    """(config files, bundle id overrides) of the demo's ``train`` command for ``bundle``, outputs under
    ``workdir/<stage>``: the demo's argv goes through the stage's real console script (fire, the flag -> bundle id
    mapping, the ``--config`` preset) and is caught where that script would create the bundle workflow."""
    from importlib.metadata import entry_points
    from unittest import mock

    from prod9_components.data import resolve_dataset_dir

    demo, stage = demo_module(), demo_stage(bundle)
    context = demo.stage_context(workdir, {"data": resolve_dataset_dir()}, demo.SPACING)
    (script,) = entry_points(group="console_scripts", name=stage.command)
    captured = {}

    def create_workflow(config_file, meta_file, logging_file, tracking, **overrides):
        captured.update(files=list(config_file), overrides=overrides)
        raise _Captured

    with mock.patch("monai.bundle.scripts.create_workflow", create_workflow):
        try:
            script.load()(demo.train_command(stage, context))
        except _Captured:
            pass
    return captured["files"], captured["overrides"]


def build_demo_trainer(bundle: str, workdir: str, device: torch.device | None = None):
    """``(parser, train#trainer)`` of the demo's run of ``bundle`` (``train.json`` + ``tiny.json`` + the demo's flags),
    outputs in ``workdir/<bundle>``. A stage that reads an earlier one's files first builds that one here; every
    build leaves its untrained best.ckpt (and stage-1 export) as its checkpoint handler writes them, for the next.
    Token and latent caches are built by the bundles themselves on first use."""
    from monai.bundle import ConfigParser

    from prod9_components.handlers.checkpoint import CheckpointHandler

    stage = demo_stage(bundle)
    if stage.needs and not os.path.isfile(os.path.join(workdir, stage.needs, "best.ckpt")):
        build_demo_trainer(stage.needs, workdir, device)
    files, overrides = demo_train_config(bundle, workdir)
    if device is not None:
        overrides["device"] = f"$torch.device('{device}')"
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(overrides)
    parser.get_parsed_content("initialize")  # the seed (and, in stage 3, the upstream export's checksum)
    trainer = parser.get_parsed_content("train#trainer")
    handler = next(h for h in parser.get_parsed_content("train#handlers") if isinstance(h, CheckpointHandler))
    if not handler.best_path.is_file():
        handler.save_best(0)
    return parser, trainer


def demo_train_step(device: torch.device, repeats: int, size: str, bundle: str, workdir: str) -> list[dict]:
    """The demo's real training iteration of ``bundle``: ``trainer._iteration`` on batches of its own data loader
    (median of at least ``DEMO_STEPS`` after ``DEMO_WARMUP``), its FLOPs, and ``data_seconds``, the median time the
    loader takes to hand over one batch. The unsuffixed row is the step the demo trains: for a GAN trainer,
    before or past the discriminator warm-up (``disc_start``) as the demo's ``demo_steps`` fall; the other phase is
    timed in a second row (``_with_discriminator`` or ``_before_disc_start``).
    ``size`` is unused: the sizes are the demo's (``tiny.json`` and its flags)."""
    torch.manual_seed(0)
    parser, trainer = build_demo_trainer(bundle, workdir, device)

    def batches():
        while True:
            yield from trainer.data_loader

    loader, data_times = batches(), []

    def next_batch():
        start = time.perf_counter()
        batch = next(loader)
        data_times.append(time.perf_counter() - start)
        return batch

    def timed(iteration: int) -> tuple[float, float]:
        trainer.state.iteration = iteration
        for _ in range(DEMO_WARMUP):
            trainer._iteration(trainer, next_batch())
        with flop_counter() as counter:
            trainer._iteration(trainer, next_batch())
        times = []
        for _ in range(max(repeats, DEMO_STEPS)):
            batch = next_batch()
            sync(device)
            start = time.perf_counter()
            trainer._iteration(trainer, batch)
            sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times), counter.get_total_flops() / 1e9

    disc_start = getattr(getattr(trainer, "loss_function", None), "disc_start", None)  # GAN trainers only
    demo_steps = demo_stage(bundle).epochs * demo_stage(bundle).batches
    phases = [("", 10**9)]
    if disc_start is not None:  # the unsuffixed row is the step the demo runs; the other phase beside it
        with_disc, without = ("_with_discriminator", 10**9), ("_before_disc_start", 0)
        phases = [("", 0), with_disc] if demo_steps <= disc_start else [("", 10**9), without]
    batch_size = parser.get_parsed_content("batch_size")
    shapes = {k: list(v.shape) for k, v in next_batch().items() if torch.is_tensor(v)}
    rows = []
    for suffix, iteration in phases:
        seconds, gflop = timed(iteration)
        data_seconds = statistics.median(data_times)
        rows.append(result(f"demo_{bundle}_train_step{suffix}", device, seconds, max(repeats, DEMO_STEPS), gflop,
                           peak_mem_mb(device), bundle=bundle, iteration=iteration, disc_start=disc_start,
                           demo_steps=demo_steps, batch=batch_size,
                           batch_shapes=shapes, volumes_per_s=round(batch_size / seconds, 3),
                           data_seconds=round(data_seconds, 5),
                           data_share=round(data_seconds / (data_seconds + seconds), 3)))
    return rows


STAGES = {"stage1": [stage1_train_step, stage1_sliding_window], "stage2": [stage2_train_step, stage2_sampling],
          "maisi": [maisi_vae_train_step, maisi_diffusion_train_step, maisi_generation, maisi_ddpm_call_ratio],
          "variants": [train_step_variants], "demo": [demo_train_step]}


def _child(fn_name: str, device: str, repeats: int, size: str, queue, *args) -> None:
    fn = {f.__name__: f for fns in STAGES.values() for f in fns}[fn_name]
    try:
        queue.put(fn(torch.device(device), repeats, size, *args))
    except BaseException:  # the parent waits on the queue: tell it rather than leave it waiting
        import traceback

        queue.put(RuntimeError(f"{fn_name}{args}: {traceback.format_exc()}"))
        raise


def machine(device: str) -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import monai

    info = {"cpu": cpu, "cpu_cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "monai": monai.__version__, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


TABLE_COLUMNS = ("stage", "name", "seconds", "volumes_per_s", "gflop", "gflops_per_s", "matmul_peak_gflops",
                 "peak_fraction", "data_seconds", "peak_mem_mb", "baseline_seconds", "ratio")


def markdown_table(report: dict) -> str:
    """The rows of a results report as a markdown table, the machine on top."""
    m = report["machine"]
    lines = [f"Measured {report['created']} on {m['cpu']} ({m['cpu_cores_available']} cores"
             + (f", {m['gpu']}" if "gpu" in m else "") + f"), torch {m['torch']}, MONAI {m['monai']}: "
             f"`{report['command']}`. ratio = seconds / baseline_seconds, both measured in the same run: the "
             "baseline is the MONAI reference of the same work, or for the variant rows the float32 eager step. "
             "peak_fraction = gflops_per_s / matmul_peak_gflops (a float32 matmul on CPU, bfloat16 on CUDA, where "
             "the steps run under autocast; gflop counts the CPU attention kernel too). The demo rows are the demo's "
             "own training iterations (tiny.json and the demo's flags), the unsuffixed one per stage the step the "
             "demo trains; data_seconds is their data loader's time per batch.", "",
             "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in report["results"]:
        lines.append("| " + " | ".join("" if row.get(k) is None else str(row[k]) for k in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], path: str, device: str, argv: list[str]) -> None:
    """``path`` (JSON: machine, command, rows) and the markdown table beside it (``.md``), atomically."""
    from prod9_components.atomic import atomic_path, write_json

    report = {"created": time.strftime("%Y-%m-%d"), "command": " ".join(["python scripts/benchmark.py", *argv]),
              "machine": machine(device), "results": rows}
    write_json(report, path)
    with atomic_path(os.path.splitext(path)[0] + ".md") as tmp:
        with open(tmp, "w") as f:
            f.write(markdown_table(report))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="prod9 speed and memory benchmarks (JSON lines on stdout)")
    parser.add_argument("stage", choices=[*STAGES, "all"], help="which stage to measure")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repetitions per measurement (median; default 3 on cuda, 1 on cpu)")
    parser.add_argument("--network", choices=list(NETWORKS), default=None,
                        help="network size (default: 'default' on cuda, 'small' on cpu)")
    parser.add_argument("--output", default=None,
                        help="also write the rows to this JSON file and a markdown table beside it "
                             "(default for 'all': benchmarks/results.json)")
    parser.add_argument("--bundles", nargs="+", default=None, metavar="BUNDLE",
                        help="demo stage: the bundles to measure (default: all seven, in the demo's order)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    demo_bundles = [s.name for s in demo_module().STAGES]
    unknown = [b for b in args.bundles or [] if b not in demo_bundles]
    if unknown:
        parser.error(f"--bundles: unknown bundle {unknown[0]!r}; choose from {', '.join(demo_bundles)}")
    output = args.output or ("benchmarks/results.json" if args.stage == "all" else None)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    size = args.network or ("default" if args.device == "cuda" else "small")
    repeats = args.repeats or (3 if args.device == "cuda" else 1)
    ctx = mp.get_context("spawn")
    report = []
    # torch.compile takes minutes per network on a CPU and buys little there: `all` runs the variants on CUDA only.
    stages = [s for s in STAGES if s != "variants" or args.device == "cuda"] if args.stage == "all" else [args.stage]
    # The demo stage's bundles share one folder: each leaves the untrained checkpoint the next one reads.
    workdir = tempfile.TemporaryDirectory(prefix="prod9-benchmark-demo-")
    for stage in stages:
        jobs = ([(demo_train_step, (b, workdir.name)) for b in demo_bundles if b in (args.bundles or demo_bundles)]
                if stage == "demo" else [(fn, ()) for fn in STAGES[stage]])
        for fn, extra in jobs:
            queue = ctx.Queue()
            process = ctx.Process(target=_child, args=(fn.__name__, args.device, repeats, size, queue, *extra))
            process.start()
            rows = queue.get()
            process.join()
            if isinstance(rows, Exception):
                raise rows
            for row in rows if isinstance(rows, list) else [rows]:
                report.append({"stage": stage, **row})
                print(json.dumps(report[-1]), flush=True)
    workdir.cleanup()
    if output:
        write_report(report, output, args.device, argv)


if __name__ == "__main__":
    sys.exit(main())
