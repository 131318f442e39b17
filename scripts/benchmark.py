#!/usr/bin/env python
"""Speed and memory of each stage, printed as one JSON object per measurement.

    python scripts/benchmark.py stage1|stage2|all [--device cpu|cuda] [--repeats N]

Every measurement has: name, device, seconds (median of `repeats`), repeats, gflop (counted with torch's FLOP
counter), gflops_per_s, matmul_peak_gflops (a float32 matmul measured in the same run), peak_mem_mb (CUDA: max
allocated; CPU: peak RSS of a fresh process that ran only this measurement), and baseline_seconds + ratio where a
MONAI reference of the same work exists. Each measurement runs in its own spawned process so peak memory is its own.
Timings are never test assertions; they live here.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

# CPU runs use a small network so a 240x240x155 sliding-window pass takes seconds, not hours; CUDA runs use the
# bundle's default (train.json) network.
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


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, GFLOP of one call). The FLOP-counting call doubles as the warm-up."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return median_seconds(fn, device, repeats), counter.get_total_flops() / 1e9


def matmul_peak_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    seconds = median_seconds(lambda: a @ b, device, repeats)
    return 2 * n**3 / seconds / 1e9


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def result(name: str, device: torch.device, seconds: float, repeats: int, gflop: float | None, peak: float,
           baseline_seconds: float | None = None, **extra) -> dict:
    row = {"name": name, "device": device.type, "seconds": round(seconds, 5), "repeats": repeats,
           "gflop": None if gflop is None else round(gflop, 3),
           "gflops_per_s": None if gflop is None else round(gflop / seconds, 2),
           "matmul_peak_gflops": round(matmul_peak_gflops(device), 1), "peak_mem_mb": round(peak, 1)}
    if baseline_seconds is not None:
        row.update(baseline_seconds=round(baseline_seconds, 5), ratio=round(seconds / baseline_seconds, 3))
    row.update(extra)
    return row


def autoencoder(device: torch.device, size: str):
    from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ

    return AutoencoderFSQ(levels=[8, 8, 8, 6, 5], **NETWORKS[size]).to(device)


# --- stage 1 measurements (each a function of device, repeats, size) -------------------------------------------


def stage1_train_step(device: torch.device, repeats: int, size: str) -> dict:
    """One generator + discriminator iteration of the stage-1 GAN trainer on a 64^3 crop, batch 2."""
    from monai.networks.nets import PatchDiscriminator

    from prod9_components.losses.autoencoder_gan import AutoencoderGANLoss

    torch.manual_seed(0)
    network = autoencoder(device, size)
    discriminator = PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=32, in_channels=1, out_channels=1,
                                       norm="INSTANCE").to(device)
    loss = AutoencoderGANLoss(disc_start=0)
    opt_g = torch.optim.Adam(network.parameters(), 1e-4)
    opt_d = torch.optim.Adam(discriminator.parameters(), 1e-4)
    images = torch.rand(2, 1, 64, 64, 64, device=device)

    def step():
        reconstruction, _ = network(images)
        losses = loss.generator_loss(images, reconstruction, discriminator(reconstruction), network.get_last_layer(), 1)
        opt_g.zero_grad()
        losses["loss"].backward()
        opt_g.step()
        logits = discriminator(torch.cat([images, reconstruction.detach()]))[-1]
        d_loss = loss.discriminator_loss(*logits.split(2))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()

    seconds, gflop = measure(step, device, repeats)
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
    config = SlidingWindowConfig(roi_size=(64, 64, 64), overlap=overlap,
                                 sw_batch_size=4 if device.type == "cuda" else 1)
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
    return TransformerDecoderSingleStream(codebook_size=15360, max_grid_size=grid, **args).to(device), grid


def _context(grid, with_context: bool, device: torch.device, batch: int):
    if not with_context:
        return None, None
    return (torch.randint(15360, (batch, 1, *grid), device=device), torch.zeros(batch, 1, dtype=torch.long,
                                                                                  device=device))


def stage2_train_step(device: torch.device, repeats: int, size: str) -> list[dict]:
    """One masked-token training step (batch 4) without context (label mode) and with one source modality."""
    from prod9_components.losses.masked_token import masked_token_loss
    from prod9_components.sampling.schedules import sample_training_mask

    torch.manual_seed(0)
    network, grid = transformer(device, size)
    optimizer = torch.optim.AdamW(network.parameters(), 3e-4)
    rows = []
    for with_context in (False, True):
        target = torch.randint(15360, (4, *grid), device=device)
        sources, labels = _context(grid, with_context, device, 4)

        def step():
            mask = sample_training_mask(target.shape).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = network(target.masked_fill(mask, network.mask_token_id), torch.full((4,), 2, device=device),
                                 sources, labels)
            loss = masked_token_loss(logits.float(), target, mask)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        seconds, gflop = measure(step, device, repeats)
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


STAGES = {"stage1": [stage1_train_step, stage1_sliding_window], "stage2": [stage2_train_step, stage2_sampling]}


def _child(fn_name: str, device: str, repeats: int, size: str, queue) -> None:
    fn = {f.__name__: f for fns in STAGES.values() for f in fns}[fn_name]
    queue.put(fn(torch.device(device), repeats, size))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="prod9 speed and memory benchmarks (JSON lines on stdout)")
    parser.add_argument("stage", choices=[*STAGES, "all"], help="which stage to measure")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repetitions per measurement (median; default 3 on cuda, 1 on cpu)")
    parser.add_argument("--network", choices=list(NETWORKS), default=None,
                        help="network size (default: 'default' on cuda, 'small' on cpu)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    size = args.network or ("default" if args.device == "cuda" else "small")
    repeats = args.repeats or (3 if args.device == "cuda" else 1)
    ctx = mp.get_context("spawn")
    for stage in STAGES if args.stage == "all" else [args.stage]:
        for fn in STAGES[stage]:
            queue = ctx.Queue()
            process = ctx.Process(target=_child, args=(fn.__name__, args.device, repeats, size, queue))
            process.start()
            rows = queue.get()
            process.join()
            for row in rows if isinstance(rows, list) else [rows]:
                print(json.dumps({"stage": stage, **row}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
