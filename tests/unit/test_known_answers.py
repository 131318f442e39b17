"""Known-answer checks: each stage trained on ONE example, with the project's real networks, losses, trainers,
samplers and schedulers (built as the tiny bundles build them), must reproduce that example.

An example that the model cannot memorise, or that the sampler cannot get back, means the feature is broken (a sign,
a timestep convention, a mask that is not applied...), not that it needs tuning (DESIGN §9: "test it where the answer
is known before tuning"). Every number is asserted beside the same number of the untrained model or of the trivial
baseline, so a check cannot pass by accident.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from monai.networks.nets import PatchDiscriminator
from monai.networks.schedulers import RFlowScheduler

from prod9_components.data.demo import synthesize_case
from prod9_components.data.token_cache import most_frequent_token
from prod9_components.data.transforms import RobustIntensityScaled
from prod9_components.engines.autoencoder_trainer import AutoencoderGANTrainer
from prod9_components.engines.maisi_diffusion_trainer import RectifiedFlowTrainer
from prod9_components.engines.maskgit_context import TokenContextBuilder
from prod9_components.engines.maskgit_trainer import MaskGiTTrainer
from prod9_components.losses.autoencoder_gan import AutoencoderGANLoss
from prod9_components.metrics.baselines import pool_baseline
from prod9_components.metrics.image_quality import brain_psnr
from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ
from prod9_components.networks.ema import ExponentialMovingAverage
from prod9_components.networks.fsq import FiniteScalarQuantizer
from prod9_components.networks.maisi_controlnet import MaisiControlNet
from prod9_components.networks.maisi_diffusion import MaisiDiffusionUNet
from prod9_components.networks.maisi_vae import MaisiVAE
from prod9_components.networks.maskgit_controlnet import MaskGiTControlNet
from prod9_components.networks.maskgit_transformer import TransformerDecoderSingleStream
from prod9_components.sampling.maskgit import MaskGiTSampler
from prod9_components.sampling.rectified_flow import sample_rectified_flow

T1 = 0  # modality label of T1 (data.modalities)


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    """One thread for the whole module (the module fixtures train before any function fixture runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def timed(name):
    start = time.perf_counter()
    return lambda: print(f"[{name}: {time.perf_counter() - start:.1f} s]")


# --- stage 1: autoencoders overfit one brain beyond the pool baseline -------------------------------------------------


@pytest.fixture(scope="module")
def brain() -> torch.Tensor:
    """One demo T1 brain (real MNI152 anatomy, 10 mm voxels) scaled like the bundles' preprocessing: (1, 1, 16^3)."""
    case = synthesize_case(seed=0, case_index=0, shape=(24, 24, 16))
    image = RobustIntensityScaled(["image"])({"image": torch.from_numpy(case.images["t1"])[None]})["image"]
    return image[:, 4:20, 4:20, :][None].float().contiguous()


def train_autoencoder(network, image: torch.Tensor, steps: int, kl_weight: float = 0.0):
    """The stage-1 trainer and loss as maskgit_stage1 / maisi_stage1_vae build them (tiny.json), on one volume; the
    discriminator never starts (an adversarial term only sharpens, it is not what makes a reconstruction)."""
    discriminator = PatchDiscriminator(spatial_dims=3, num_layers_d=2, channels=8, in_channels=1, out_channels=1,
                                       norm="INSTANCE")
    loss = AutoencoderGANLoss(recon_weight=1.0, perceptual_weight=0.1, adversarial_weight=0.1, kl_weight=kl_weight,
                              disc_start=10**9, perceptual="focal_frequency")
    trainer = AutoencoderGANTrainer(
        device="cpu", max_epochs=1, train_data_loader=[{"image": image}] * steps, network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=5e-4, betas=(0.5, 0.9)), discriminator=discriminator,
        disc_optimizer=torch.optim.Adam(discriminator.parameters(), lr=5e-4, betas=(0.5, 0.9)), loss_function=loss)
    trainer.run()
    return network.eval()


# Steps: the PSNR of Adam(0.5, 0.9) training wanders by 1-3 dB from step to step; at these counts the margin over
# the pool baseline was 6.8-9.1 dB (FSQ) and 8.3-10.5 dB (VAE, which starts slower) over 5 seeds and demo cases.
@pytest.mark.parametrize(("family", "steps"), [("fsq", 150), ("vae", 200)])
def test_autoencoder_overfits_one_brain_beyond_pool_baseline(brain, family, steps):
    """A 4x autoencoder trained on one brain reconstructs it far better than average-pooling by 4 and upsampling
    (which keeps one number per latent cell, the FSQ/VAE latent keeps 5/4): the encoder, the quantizer or posterior,
    the decoder and the training loop all work. Before training it is far below the baseline."""
    done = timed(f"{family} autoencoder")
    torch.manual_seed(0)
    if family == "fsq":
        network = AutoencoderFSQ(num_channels=[8, 16, 32], num_res_blocks=[1, 1, 1], levels=[8, 8, 8, 6, 5],
                                 norm_num_groups=4)
        # Through the token indices: what stage 2 is trained on and decodes.
        reconstruct = lambda x: network.decode_stage_2_outputs(network.quantize_stage_2_inputs(x))  # noqa: E731
    else:
        network = MaisiVAE(num_channels=[8, 16, 32], num_res_blocks=[1, 1, 1], latent_channels=4, norm_num_groups=4)
        reconstruct = lambda x: network.decode(network.encode(x)[0])  # noqa: E731  (the latent mean, as cached)
    with torch.no_grad():
        before = float(brain_psnr(reconstruct(brain), brain))
    train_autoencoder(network, brain, steps=steps, kl_weight=1e-7 if family == "vae" else 0.0)
    with torch.no_grad():
        after = float(brain_psnr(reconstruct(brain), brain))
    pool = float(brain_psnr(pool_baseline(brain, network.downsample_factor), brain))
    print(f"{family}: brain PSNR untrained {before:.2f} dB, trained {after:.2f} dB, pool baseline {pool:.2f} dB")
    done()
    assert before < pool
    assert after > pool + 5.0


# --- MaskGiT stage 2: one token grid is memorised and sampled back ------------------------------------------------

CODEBOOK = 8 * 5 * 5 * 5  # FSQ levels [8, 5, 5, 5]: the bundles' 15,360 codes only make the head 15x slower
GRID = (4, 4, 4)
FACTOR = 4  # stage-1 downsampling: a token is 4^3 voxels
BACKGROUND = 517  # an arbitrary code standing for the code of air


def make_token_grid() -> torch.Tensor:
    """(4, 4, 4) tokens: a background token around a 'brain' of distinct random tokens (like an encoded brain crop)."""
    generator = torch.Generator().manual_seed(0)
    z, y, x = torch.meshgrid(*(torch.arange(n) - (n - 1) / 2 for n in GRID), indexing="ij")
    brain = (z.abs() < 1) & (y.abs() < 1)  # a 2x2x4 bar through the centre: 16 cells, 48 of background
    tokens = torch.full(GRID, BACKGROUND, dtype=torch.int64)
    tokens[brain] = torch.randperm(CODEBOOK, generator=generator)[: int(brain.sum())]
    return tokens


@pytest.fixture(scope="module")
def token_grid() -> torch.Tensor:
    return make_token_grid()


def tiny_transformer() -> TransformerDecoderSingleStream:
    """maskgit_stage2_label's network_def with tiny.json's overrides."""
    torch.manual_seed(0)
    return TransformerDecoderSingleStream(codebook_size=CODEBOOK, hidden_dim=64, num_layers=2, num_heads=4,
                                          num_modalities=4, max_context_length=8, max_grid_size=[8, 8, 8],
                                          dropout=0.0)


def train_maskgit(network, batches: list[dict], steps: int, control_mask_key: str | None = None,
                  context_dropout: float = 0.1):
    """MaskGiTTrainer as the stage-2/3 bundles build it (AdamW, cosine masking, label context), tiny learning rate."""
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-3,
                                  betas=(0.9, 0.95), weight_decay=0.01)
    context = TokenContextBuilder(target_modalities=["T1"], source_modalities=[], context_dropout=context_dropout)
    MaskGiTTrainer(device="cpu", max_epochs=1, train_data_loader=[batches[i % len(batches)] for i in range(steps)],
                   network=network, optimizer=optimizer, context_builder=context, schedule="cosine",
                   control_mask_key=control_mask_key).run()
    return network.eval()


def as_batch(tokens: torch.Tensor, copies: int = 4) -> dict:
    """Token grid (d, h, w) -> the trainer's batch (B, 4 modalities, d, h, w); the T1 channel is the target."""
    return {"tokens": tokens.expand(copies, 4, *tokens.shape).clone()}


def sample_grid(network, seed: int = 0, **model_kwargs) -> torch.Tensor:
    sampler = MaskGiTSampler(num_steps=12, schedule="cosine", guidance_scale=1.0)  # the bundles' sampler
    label = torch.tensor([T1])
    return sampler.sample(network, (1, *GRID), label, generator=torch.Generator().manual_seed(seed),
                          model_kwargs=model_kwargs or None)[0]


@pytest.fixture(scope="module")
def maskgit_base(token_grid) -> dict:
    done = timed("maskgit stage 2")
    untrained = tiny_transformer().eval()
    network = train_maskgit(tiny_transformer(), [as_batch(token_grid)], steps=150)
    done()
    return {"untrained": untrained, "trained": network}


def test_transformer_learns_background_token_and_samples_its_grid(token_grid, maskgit_base):
    """Trained on one token grid, the transformer predicts the background token at every masked background cell
    from an all-[MASK] input, and 12 MaskGiT steps sample the memorised grid back: masking polarity, positions and
    the sampler's fixing of tokens all work. The untrained model gets neither."""
    background = most_frequent_token(token_grid)
    is_background = token_grid == background
    all_masked = torch.full((1, *GRID), maskgit_base["trained"].mask_token_id)
    scores = {}
    for name, network in maskgit_base.items():
        with torch.no_grad():
            predicted = network(all_masked, torch.tensor([T1])).argmax(dim=1)[0]
        samples = torch.stack([sample_grid(network, seed) for seed in range(3)])
        scores[name] = ((predicted[is_background] == background).float().mean().item(),
                        (samples == token_grid).float().mean().item())
    print("background-token accuracy / sampled-grid token accuracy: " +
          ", ".join(f"{name} {b:.3f} / {s:.3f}" for name, (b, s) in scores.items()))
    assert scores["untrained"][0] < 0.1 and scores["untrained"][1] < 0.1
    assert scores["trained"][0] == 1.0
    assert scores["trained"][1] >= 0.95


def test_transformer_expected_codes_are_the_memorised_grid(token_grid, maskgit_base):
    """The expected FSQ codes (one pass from an all-[MASK] grid, ``--expected-codes true``) of the model trained on
    one grid round to that grid's tokens and sit close to its codes; the untrained model's sit near the codebook's
    mean, far from them."""
    fsq = FiniteScalarQuantizer([8, 5, 5, 5])  # CODEBOOK's levels
    truth = fsq.embed(token_grid[None])
    scores = {}
    for name, network in maskgit_base.items():
        codes = MaskGiTSampler().expected_codes(network, fsq.codebook(), (1, *GRID), torch.tensor([T1]))
        scores[name] = ((codes - truth).abs().mean().item(), (fsq.quantize(codes)[0] == token_grid).float().mean())
    print("mean error of the expected codes / their nearest tokens' accuracy: " +
          ", ".join(f"{name} {e:.3f} / {a:.3f}" for name, (e, a) in scores.items()))
    assert scores["trained"][0] < 0.05 and scores["trained"][1] >= 0.9  # the finest FSQ step is 0.25 (8 levels)
    assert scores["untrained"][0] > 0.3 and scores["untrained"][1] < 0.1


# --- MaskGiT stage 3: a ControlNet writes a chosen token where the mask is -------------------------------------------


def tumour_mask() -> torch.Tensor:
    """(16, 16, 16) labels: an enhancing-tumour block (label 3 after mapping) covering 2x2x1 brain tokens."""
    mask = torch.zeros([n * FACTOR for n in GRID], dtype=torch.int64)
    mask[4:12, 4:12, 4:8] = 3
    return mask


def token_cells(mask: torch.Tensor) -> torch.Tensor:
    """Cells of the 4x coarser grid (tokens or latent voxels) that the image-resolution mask touches."""
    return torch.nn.functional.max_pool3d((mask > 0).float()[None, None], FACTOR)[0, 0] > 0


def test_maskgit_controlnet_writes_token_inside_mask(token_grid, maskgit_base):
    """A MaskGiT ControlNet (stage 3, mask control) trained on (mask, grid with a 'tumour' token inside the mask)
    and (empty mask, grid) predicts the tumour token inside the mask but not under the empty mask, and samples it
    there with the memorised grid outside: the mask reaches the frozen base through the trained branch.
    Zero-initialised, it predicts and samples the base's grid.

    The tumour token is one the base emits elsewhere: the base's output head is frozen, and a code the base never
    emitted has a head row that training pushed down (measured: its probability saturates near 0.004 however long
    the ControlNet trains). In real data tumour codes occur in the stage-2 training set.
    """
    mask, empty = tumour_mask(), torch.zeros(tumour_mask().shape, dtype=torch.int64)
    inside = token_cells(mask)
    tumour_token = int(token_grid[(token_grid != BACKGROUND) & ~inside][0])
    with_tumour = torch.where(inside, tumour_token, token_grid)
    batch = {"tokens": torch.cat([as_batch(with_tumour, 2)["tokens"], as_batch(token_grid, 2)["tokens"]]),
             "seg": torch.stack([mask, mask, empty, empty])[:, None]}

    def build():
        torch.manual_seed(0)
        return MaskGiTControlNet.from_base(maskgit_base["trained"], control_type="mask", downsample_factor=FACTOR)

    done = timed("maskgit stage 3")
    untrained = build().eval()
    trained = train_maskgit(build(), [batch], steps=100, control_mask_key="seg", context_dropout=0.0)
    done()
    all_masked = torch.full((1, *GRID), maskgit_base["trained"].mask_token_id)
    results = {}
    for name, network in (("untrained", untrained), ("trained", trained)):
        with torch.no_grad():  # one step from all-[MASK]: the model's first choice at every cell
            first = network(all_masked, torch.tensor([T1]), control_mask=mask[None]).argmax(dim=1)[0]
            first_empty = network(all_masked, torch.tensor([T1]), control_mask=empty[None]).argmax(dim=1)[0]
        sampled = torch.stack([sample_grid(network, seed, control_mask=mask[None]) for seed in range(2)])
        results[name] = {"first inside": (first[inside] == tumour_token).float().mean().item(),
                         "first inside, empty mask": (first_empty[inside] == tumour_token).float().mean().item(),
                         "sampled inside": (sampled[:, inside] == tumour_token).float().mean().item(),
                         "sampled outside = grid": (sampled[:, ~inside] == token_grid[~inside]).float().mean().item()}
    print("tumour token inside the mask: " + "; ".join(
        f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()) for name, r in results.items()))
    assert results["untrained"]["first inside"] == 0.0 and results["untrained"]["sampled inside"] == 0.0
    assert results["trained"]["first inside"] == 1.0
    assert results["trained"]["first inside, empty mask"] == 0.0
    # Sampling draws each token from the softmax (temperature 1): a cell may miss at p(tumour) ~ 0.85.
    assert results["trained"]["sampled inside"] >= 0.75
    assert results["trained"]["sampled outside = grid"] >= 0.95


# --- MAISI stage 2: rectified flow brings noise back to the one latent it was trained on ------------------------------

LATENT = (4, 4, 4, 4)


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    """A smooth (1, 4, 4, 4, 4) latent scaled to unit std, like the bundles' cached latents after ``scale_factor``."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, *LATENT, generator=generator)
    smooth = torch.nn.functional.avg_pool3d(noise, 3, stride=1, padding=1, count_include_pad=False)
    return (smooth - smooth.mean()) / smooth.std()


def rflow_scheduler() -> RFlowScheduler:
    """maisi_stage2_diffusion's scheduler_args, except the reference size of the timestep shift. The bundle's 32^3
    suits real latents; against this 4^3 latent it would draw 90% of the training timesteps below 0.53 T, where the
    sampler's first step already lands (measured: ~3x the training steps for the same error). Equal sizes: no shift."""
    return RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False, sample_method="uniform",
                          use_timestep_transform=True, base_img_size_numel=math.prod(LATENT[1:]), spatial_dim=3)


def tiny_unet() -> MaisiDiffusionUNet:
    """maisi_stage2_diffusion's network_def with tiny.json's overrides."""
    torch.manual_seed(0)
    return MaisiDiffusionUNet(latent_channels=4, num_channels=[16, 32, 32], num_res_blocks=[1, 1, 1],
                              attention_levels=[False, False, True], norm_num_groups=8, num_head_channels=8,
                              use_flash_attention=False)


def train_flow(network, batches: list[dict], steps: int, lr: float, ema=None, control_keys=None,
               label_dropout: float = 0.1):
    """RectifiedFlowTrainer as the MAISI stage-2/3 bundles build it (AdamW, the bundle's scheduler, label dropout)."""
    torch.manual_seed(1)
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    loader = [batches[i % len(batches)] for i in range(steps)]
    RectifiedFlowTrainer(device="cpu", max_epochs=1, train_data_loader=loader, network=network, optimizer=optimizer,
                         scheduler=rflow_scheduler(), ema=ema, label_dropout=label_dropout,
                         control_keys=control_keys).run()
    return network.eval()


def sample_latent(network, seed: int, **controls) -> torch.Tensor:
    noise = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(seed))
    return sample_rectified_flow(network, rflow_scheduler(), noise, torch.tensor([T1]), num_steps=10,
                                 guidance_scale=1.0, null_label=network.null_label, **controls)


@pytest.fixture(scope="module")
def flow_base(latent) -> dict:
    done = timed("maisi stage 2")
    network = tiny_unet()
    untrained = tiny_unet().eval()
    ema = ExponentialMovingAverage(network, decay=0.999)
    batch = {"latent": latent.expand(8, *LATENT).clone(), "label": torch.full((8,), T1)}
    train_flow(network, [batch], steps=250, lr=5e-3, ema=ema)
    done()
    return {"untrained": untrained, "trained": network, "ema": ema.module.eval()}


def test_rectified_flow_samples_its_one_latent(latent, flow_base):
    """The MAISI UNet trained with the bundle's RFlowScheduler on one latent maps fresh noise to that latent in 10
    Euler steps (the sampler walks t from T to 0 with the training convention of noise and velocity); the untrained
    model stays at noise-level error."""
    errors = {}
    for name, network in flow_base.items():
        samples = torch.cat([sample_latent(network, seed) for seed in range(2)])
        errors[name] = ((samples - latent).square().mean() / latent.var()).item()
    print("latent MSE / latent variance after 10 steps: " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
    assert errors["untrained"] > 0.5
    assert errors["trained"] < 0.05
    assert errors["ema"] < 0.05


# --- MAISI stage 3: a ControlNet moves the latent inside the mask -------------------------------------------------


def test_maisi_controlnet_moves_latent_inside_mask(latent, flow_base):
    """A MAISI ControlNet (mask condition, as maisi_stage3_controlnet builds it) around the trained UNet, trained on
    (mask, latent raised by 2 inside the mask) and (empty mask, latent), samples the raised latent under the mask and
    the plain latent under the empty mask: its residuals reach the frozen UNet and follow the mask. Zero-initialised,
    it samples the base's latent (no shift)."""
    image_mask = torch.zeros([n * FACTOR for n in LATENT[1:]], dtype=torch.int64)
    image_mask[4:12, 4:12, 8:16] = 3
    inside = token_cells(image_mask)  # the latent cells under the mask, (4, 4, 4)
    target = latent + 2.0 * inside.float()
    empty = torch.zeros_like(image_mask)
    batch = {"latent": torch.cat([target.expand(4, *LATENT), latent.expand(4, *LATENT)]),
             "label": torch.full((8,), T1), "seg": torch.stack([image_mask] * 4 + [empty] * 4)[:, None]}

    def build():
        torch.manual_seed(0)
        return MaisiControlNet.from_base(flow_base["trained"], condition_type="mask+label", downsample_factor=FACTOR,
                                         conditioning_channels=[8, 16, 32])

    def shift(sample):  # the inside-minus-outside mean of (sample - latent), averaged over channels
        difference = sample - latent
        return (difference[..., inside].mean() - difference[..., ~inside].mean()).item()

    done = timed("maisi stage 3")
    untrained = build().eval()
    trained = train_flow(build(), [batch], steps=100, lr=2e-3, control_keys={"seg": "control_mask"},
                         label_dropout=0.0)
    done()
    results = {}
    for name, network in (("untrained", untrained), ("trained", trained)):
        results[name] = (shift(sample_latent(network, 0, control_mask=image_mask[None, None])),
                         shift(sample_latent(network, 0, control_mask=empty[None, None])))
    print("latent shift inside vs outside the mask (target 2.0) with the mask / with an empty mask: " +
          ", ".join(f"{n} {a:.3f} / {b:.3f}" for n, (a, b) in results.items()))
    assert abs(results["untrained"][0]) < 0.3
    assert results["trained"][0] > 1.5
    assert abs(results["trained"][1]) < 0.3
    # conditioning_scale 0 leaves the base (no shift), and the shift grows with the scale up to the trained one
    scaled = [shift(sample_latent(trained, 0, control_mask=image_mask[None, None], conditioning_scale=scale))
              for scale in (0.0, 0.5)]
    print(f"shift at conditioning scale 0 / 0.5 / 1: {scaled[0]:.3f} / {scaled[1]:.3f} / {results['trained'][0]:.3f}")
    assert abs(scaled[0] - results["untrained"][0]) < 1e-4
    assert scaled[0] < scaled[1] - 0.3 and scaled[1] < results["trained"][0] - 0.3
