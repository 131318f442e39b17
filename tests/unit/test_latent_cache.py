"""MAISI latent cache: deterministic latent means keyed by the VAE file, the scale factor, the canvas cases are padded
to before they are encoded."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from prod9_components.data.brats import discover_cases
from prod9_components.data.case_cache import file_sha256
from prod9_components.data.latent_cache import (
    LoadLatentd,
    build_latent_cache,
    latent_cache_key,
    latent_canvas,
    latent_items,
    latent_scale_factor,
    load_latent_file,
)
from prod9_components.data.transforms import preprocessing_contract
from prod9_components.engines.case_encoder import CaseLatentEncoder
from prod9_components.inference import SlidingWindowConfig
from prod9_components.networks.export import atomic_save, network_record
from prod9_components.networks.maisi_vae import MaisiVAE

SW = SlidingWindowConfig(roi_size=(48, 48, 32))  # one window covers a preprocessed demo case at 5 mm


def tiny_vae_export(path, seed: int):
    torch.manual_seed(seed)
    vae = MaisiVAE(num_channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, False), norm_num_groups=4)
    atomic_save(network_record(vae, preprocessing=preprocessing_contract([5, 5, 5], [0, 1]), stage="maisi_stage1_vae"),
                path)
    return path


@pytest.fixture(scope="module")
def cached(demo_dataset_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_cache")
    export = tiny_vae_export(root / "vae.pt", seed=0)
    encoder = CaseLatentEncoder.from_export(export, SW)
    cases = discover_cases(demo_dataset_dir)[:2]
    key = latent_cache_key(encoder.autoencoder_sha256, encoder.preprocessing, encoder.settings)
    items = build_latent_cache(cases, root / "cache", key, encoder)
    return {"root": root, "export": export, "encoder": encoder, "cases": cases, "key": key, "items": items}


def test_latents_are_the_deterministic_posterior_mean(cached):
    encoder, case = cached["encoder"], cached["cases"][0]
    arrays = load_latent_file(cached["items"][0]["latent"])
    assert arrays["latent"].shape[:2] == (4, 4) and arrays["latent"].dtype == np.float32
    assert arrays["seg"].shape == tuple(2 * n for n in arrays["latent"].shape[2:])  # 2x VAE: one grid with the mask
    data = encoder.preprocess(case)
    with torch.no_grad():
        z_mu, z_sigma = encoder.autoencoder.encode(data["t2"].as_tensor()[None])
    assert np.allclose(arrays["latent"][2], z_mu[0].numpy(), atol=1e-5)  # the mean, never a sample
    assert float(z_sigma.mean()) > 1e-3  # a sample would differ
    again = build_latent_cache(cached["cases"][:1], cached["root"] / "again", cached["key"], encoder)
    assert np.array_equal(load_latent_file(again[0]["latent"])["latent"], arrays["latent"])  # bit for bit


def test_another_vae_file_gets_another_key(cached, tmp_path):
    other = tiny_vae_export(tmp_path / "vae.pt", seed=1)
    encoder = cached["encoder"]
    assert latent_cache_key(file_sha256(other), encoder.preprocessing, encoder.settings) != cached["key"]


def test_scale_factor_gives_unit_std_and_is_stored(cached):
    items = cached["items"]
    scale = latent_scale_factor(items)
    values = np.concatenate([load_latent_file(i["latent"])["latent"].ravel() for i in items])
    assert (values * scale).std() == pytest.approx(1.0, rel=1e-4)
    stored = list((cached["root"] / "cache" / cached["key"]).glob("scale_factor_*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["cases"] == sorted(i["case"] for i in items)
    assert latent_scale_factor(items[:1]) != scale  # another set of cases, another factor (and another file)


@pytest.fixture(scope="module")
def canvas(cached):
    """The cases encoded on one canvas, as stage 2 caches them: latent_canvas, then an encoder with that size."""
    encoder = cached["encoder"]
    args = (cached["root"] / "cache", encoder.autoencoder_sha256, encoder.spacing, encoder.intensity_range,
            encoder.factor)
    size = latent_canvas(cached["cases"], *args, multiple=8)
    on_canvas = CaseLatentEncoder.from_export(cached["export"], SW, latent_size=size)
    key = latent_cache_key(on_canvas.autoencoder_sha256, on_canvas.preprocessing, on_canvas.settings)
    return {"size": size, "args": args, "encoder": on_canvas, "key": key,
            "items": build_latent_cache(cached["cases"], cached["root"] / "cache", key, on_canvas)}


def test_cases_are_padded_to_the_canvas_before_they_are_encoded(cached, canvas):
    """The canvas is the smallest multiple of 8 latent cells that fits every case; each case is centre-padded with
    background on the image grid and THEN encoded (a padded latent decodes 6-7 dB worse), its mask with it."""
    size, f = canvas["size"], cached["encoder"].factor
    grids = np.array([cached["encoder"].preprocess(case)["t1"].shape[1:] for case in cached["cases"]])
    assert all(s % 8 == 0 for s in size) and (grids.max(0) <= f * np.array(size)).all()
    assert (f * np.array(size) - grids.max(0) < 8 * f).all()  # no larger than needed
    assert canvas["key"] != cached["key"]  # the canvas is part of the cache key

    case, plain = cached["cases"][1], cached["encoder"].preprocess(cached["cases"][1])
    data = canvas["encoder"].preprocess(case)
    offsets = [(f * s - g) // 2 for s, g in zip(size, plain["t2"].shape[1:])]
    inside = (slice(None), *[slice(o, o + g) for o, g in zip(offsets, plain["t2"].shape[1:])])
    for key in ("t2", "seg"):
        assert list(data[key].shape[1:]) == [f * s for s in size]
        assert torch.equal(data[key][inside], plain[key])
        border = data[key].clone()
        border[inside] = 0
        assert not border.any()  # background (0) around the case
    arrays = load_latent_file(canvas["items"][1]["latent"])
    assert arrays["latent"].shape[2:] == tuple(size) and np.array_equal(arrays["seg"], data["seg"][0].numpy())
    expected = canvas["encoder"].wrapper.encode(data["t2"].as_tensor()[None])[0].numpy()
    assert np.allclose(arrays["latent"][2], expected, atol=1e-5)  # the padded image's latent, not a padded latent

    with pytest.raises(ValueError, match=r"case BraTS\w+: its preprocessed grid .* is larger than the latent canvas"):
        CaseLatentEncoder.from_export(cached["export"], SW, latent_size=[2, 2, 2]).preprocess(case)
    with pytest.raises(ValueError, match=r"latent canvas \[8000, 8000, 8000\] .* voxels; the limit is"):
        CaseLatentEncoder.from_export(cached["export"], SW, latent_size=[4000] * 3)  # a hostile checkpoint's size
    with pytest.raises(ValueError, match=r"latent_size \[4, 0, 4\]: expected three positive sizes"):
        CaseLatentEncoder.from_export(cached["export"], SW, latent_size=[4, 0, 4])


def test_training_latents_are_scaled_and_labelled(canvas):
    items = latent_items(canvas["items"], ["T1", "FLAIR"])
    assert [i["modality"] for i in items] == [0, 3, 0, 3]
    out = LoadLatentd(scale_factor=2.0, latent_size=canvas["size"])(items[1])
    raw = torch.from_numpy(load_latent_file(items[1]["latent"])["latent"][3])
    assert int(out["label"]) == 3 and torch.equal(out["latent"], raw * 2.0)
    with pytest.raises(ValueError, match=r"cached latent grid .* is not the canvas \[2, 2, 2\]"):
        LoadLatentd(1.0, [2, 2, 2])(items[0])


def test_control_items_put_mask_and_source_on_the_latent_cells(cached, canvas):
    """Stage-3 items: the mask and the source on the canvas the latent was encoded from (latent cell i covers image
    voxels f*i .. f*i + f - 1); unused images are dropped; a grid the latent was not encoded from is refused."""
    from prod9_components.data.control_latents import LoadControlLatentd, control_items

    items = control_items(canvas["items"], ["T1", "T2"], "T1")
    assert [(i["modality"], i["source_modality"]) for i in items] == [(2, 0), (2, 0)]  # T1 -> T1 is skipped
    data = canvas["encoder"].preprocess(cached["cases"][0])
    latent = load_latent_file(items[0]["latent"])["latent"][2]
    out = LoadControlLatentd(2.0, canvas["size"], 2, keep_target_image=True)({**items[0], **data})
    assert not {"t1", "t1ce", "t2", "flair", "t1_intensity"} & set(out) and int(out["label"]) == 2
    assert torch.equal(out["latent"], 2.0 * torch.from_numpy(latent))
    for key, real in (("seg", data["seg"]), ("source", data["t1"]), ("image", data["t2"])):
        assert list(out[key].shape) == [1, *[2 * s for s in canvas["size"]]]
        assert torch.equal(out[key], real.as_tensor().to(out[key].dtype))
    assert out["seg"].dtype == torch.int64 and int(out["seg"].max()) > 0

    shifted = {**items[0], **data, "t2": data["t2"][:, :-2]}  # a grid the cached latent was not encoded from
    with pytest.raises(ValueError, match=r"case .*: preprocessed grid .* is not 2 x the cached latent grid"):
        LoadControlLatentd(2.0, canvas["size"], 2)(shifted)
    with pytest.raises(ValueError, match=r"case .*: cached latent grid .* is not the canvas"):
        LoadControlLatentd(2.0, [s + 1 for s in canvas["size"]], 2)({**items[0], **data})
    with pytest.raises(ValueError, match="reads a source image: set source_modality"):
        control_items(canvas["items"], ["T2"], None)
    with pytest.raises(ValueError, match="no target modality is left once the source T2 is removed"):
        control_items(canvas["items"], ["T2"], "T2")
    assert "source_modality" not in control_items(canvas["items"], ["T2"], "T1", uses_source=False)[0]


def test_control_dataset_preprocesses_each_case_once(cached, canvas):
    """ControlDataset gives every (case, target) item what per-item preprocessing gives it, with each case's
    preprocessing run once (it loads and resamples all four modalities and the mask, whichever the target), and keeps
    a validation shard's ``val_index``."""
    from monai.transforms import Compose, Lambda

    from prod9_components.data.control_latents import ControlDataset, LoadControlLatentd, control_items

    calls = []

    def preprocess(case):
        calls.append(case["case"])
        return {**case, **canvas["encoder"].preprocess(case)}  # keeps the latent path, as the bundles' transforms

    items = control_items(canvas["items"], ["T1", "T2", "FLAIR"], "T1")  # 2 cases x 2 targets
    load = Compose([LoadControlLatentd(2.0, canvas["size"], 2, keep_target_image=True)])
    sharded = [{**item, "val_index": 10 + i} for i, item in enumerate(items)]
    dataset = ControlDataset(sharded, Compose([Lambda(preprocess)]), load)  # a MONAI transform: CacheDataset caches it
    assert len(dataset) == 4 and sorted(calls) == sorted({i["case"] for i in items})  # 2 calls, not 4
    for item, out in zip(items, (dataset[i] for i in range(4))):
        expected = load({**item, **canvas["encoder"].preprocess(item)})
        assert int(out["label"]) == item["modality"] and out["case"] == item["case"]
        for key in ("latent", "seg", "source", "image"):
            assert torch.equal(out[key], expected[key]), key
    assert [dataset[i]["val_index"] for i in range(4)] == [10, 11, 12, 13]
    assert len(calls) == 2  # reading items never preprocesses again


def test_the_scale_factor_follows_the_input_volumes(tmp_path):
    """The stored scale factor is keyed by the cases' input fingerprints, not their names: after a volume changes,
    its latents are encoded again and the factor is computed again, never read from the old file."""
    case = {"case": "BraTS_0001"}
    for key in ("t1", "t1ce", "t2", "flair"):
        case[key] = str(tmp_path / f"{key}.nii.gz")
        (tmp_path / f"{key}.nii.gz").write_bytes(key.encode())
    rng = np.random.default_rng(0)

    def encode(std):
        return lambda c: {"latent": rng.normal(0, std, (4, 1, 2, 2, 2)), "seg": np.zeros((4, 4, 4), np.uint8),
                          "affine": np.eye(4), "intensity": np.tile([0.0, 1.0], (4, 1))}

    items = build_latent_cache([case], tmp_path / "cache", "k", encode(1.0))
    first = latent_scale_factor(items)
    stat = os.stat(case["flair"])
    os.utime(case["flair"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a corrected volume
    items = build_latent_cache([case], tmp_path / "cache", "k", encode(10.0))
    assert latent_scale_factor(items) == pytest.approx(first / 10, rel=0.5)
    assert len(list((tmp_path / "cache" / "k").glob("scale_factor_*.json"))) == 2
