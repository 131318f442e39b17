"""Stage-2 token cache: one image -> indices function, reuse and invalidation, shared grid, token-grid crops."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from prod9_components.data.brats import discover_cases
from prod9_components.data.case_cache import file_sha256
from prod9_components.data.token_cache import (
    CenterTokenCropd,
    LoadTokensd,
    RandTokenCropd,
    build_token_cache,
    load_token_file,
    most_frequent_token,
    pad_or_crop,
    restore,
    scale_crop_info,
    seg_to_token_grid,
    token_cache_key,
)
from prod9_components.data.transforms import preprocessing, preprocessing_contract
from prod9_components.engines.tokenizer import CaseTokenizer
from prod9_components.inference import AutoencoderInferenceWrapper, SlidingWindowConfig
from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ
from prod9_components.networks.export import atomic_save, network_record

MODALITIES = ("t1", "t1ce", "t2", "flair")
# One window covers a whole preprocessed demo case (<= 48x48x32 at 5 mm): the fastest encode on CPU.
SW = SlidingWindowConfig(roi_size=(48, 48, 32))


class CountingEncoder:
    """Counts the cases it encodes; encodes with the real tokenizer, or replays arrays the tokenizer made."""

    def __init__(self, tokenizer: CaseTokenizer | None = None, arrays: dict | None = None) -> None:
        self.tokenizer, self.arrays, self.calls = tokenizer, arrays, []

    def __call__(self, case):
        self.calls.append(case["case"])
        return self.tokenizer(case) if self.tokenizer is not None else dict(self.arrays)


@pytest.fixture(scope="module")
def stage1(demo_dataset_dir, tmp_path_factory):
    """A random-init tiny FSQ export, its tokenizer, and a cache of one demo case built once (~4 s on 2 cores)."""
    root = tmp_path_factory.mktemp("token_cache")
    torch.manual_seed(0)
    net = AutoencoderFSQ(num_channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, False),
                         norm_num_groups=4, levels=(4, 4, 4))
    export = root / "autoencoder.pt"
    atomic_save(network_record(net, preprocessing=preprocessing_contract([5, 5, 5], [0, 1])), export)
    tokenizer = CaseTokenizer.from_export(export, SW)
    cases = discover_cases(demo_dataset_dir)[:2]
    key = token_cache_key(tokenizer.autoencoder_sha256, tokenizer.preprocessing, tokenizer.settings)
    encoder = CountingEncoder(tokenizer)
    items = build_token_cache(cases[:1], root / "cache", key, encoder, metadata=tokenizer.cache_metadata)
    return {"root": root, "export": export, "tokenizer": tokenizer, "cases": cases, "key": key, "items": items,
            "calls": list(encoder.calls), "arrays": load_token_file(items[0]["tokens"])}


def test_tokens_are_the_wrappers_indices_and_decode_like_the_quantized_latent(stage1):
    # Trap 1: one function maps image -> indices, and embedding the indices gives back the decoder's codes.
    tokenizer, case, item = stage1["tokenizer"], stage1["cases"][0], stage1["items"][0]
    arrays = load_token_file(item["tokens"])
    data = Compose(preprocessing(MODALITIES, ("seg",), spacing=(5, 5, 5), intensity_range=(0, 1), k_divisible=2))(
        dict(case))
    net = tokenizer.autoencoder
    wrapper = AutoencoderInferenceWrapper(net, SW)
    for m, key in enumerate(MODALITIES):
        image = data[key].as_tensor()[None]
        expected = wrapper.quantize_stage_2_inputs(image)[0]
        np.testing.assert_array_equal(arrays["tokens"][m], expected.numpy())
    latent = wrapper.encode(data["flair"].as_tensor()[None])
    with torch.no_grad():
        from_tokens = net.decode_stage_2_outputs(torch.from_numpy(arrays["tokens"][3:4].astype(np.int64)))
        from_latent = net.decode(latent)
    torch.testing.assert_close(from_tokens, from_latent, rtol=0, atol=0)
    # The mask, grid and intensities are those of the same joint preprocessing.
    np.testing.assert_array_equal(arrays["seg"], data["seg"][0].numpy().astype(np.uint8))
    np.testing.assert_allclose(arrays["affine"], np.asarray(data["t1"].affine), atol=1e-6)
    np.testing.assert_allclose(arrays["intensity"][2], data["t2_intensity"].numpy())


def test_cache_arrays_share_one_grid(stage1):
    for item in stage1["items"]:
        with np.load(item["tokens"], allow_pickle=False) as npz:  # plain arrays: no pickle needed
            arrays = {name: npz[name] for name in npz.files}
        tokens, seg, seg_tokens = arrays["tokens"], arrays["seg"], arrays["seg_tokens"]
        assert tokens.dtype == np.int16 and tokens.shape[0] == 4 and tokens.min() >= 0 and tokens.max() < 64
        assert seg.dtype == np.uint8 and seg.shape == tuple(2 * n for n in tokens.shape[1:])
        assert seg_tokens.shape == tokens.shape[1:]
        assert set(np.unique(seg)) == {0, 1, 2, 3}  # the demo tumour has all three labels
        np.testing.assert_array_equal(seg_tokens, seg_to_token_grid(seg, 2))
        assert arrays["affine"].shape == (4, 4) and arrays["intensity"].shape == (4, 2)
        assert (arrays["intensity"][:, 1] > arrays["intensity"][:, 0]).all()
    assert stage1["items"][0]["t1"] == stage1["cases"][0]["t1"]  # other case keys kept


def test_seg_token_grid_takes_the_most_severe_label():
    seg = np.zeros((4, 2, 2), np.uint8)
    seg[0, 0, 0], seg[1, 1, 1] = 2, 1  # block 0: oedema + necrotic -> necrotic
    seg[2:, :, :] = 2
    seg[3, 1, 0] = 3  # block 1: mostly oedema + one enhancing voxel -> enhancing
    np.testing.assert_array_equal(seg_to_token_grid(seg, 2), [[[1]], [[3]]])
    seg = np.full((2, 2, 3), 2, np.uint8)  # odd size: padded with background, not a label
    np.testing.assert_array_equal(seg_to_token_grid(seg, 2), [[[2, 2]]])
    assert most_frequent_token(np.array([[5, 7, 7], [1, 7, 5]])) == 7


def test_second_build_reuses_and_a_new_export_re_encodes(stage1, caplog):
    case = stage1["cases"][0]
    assert stage1["calls"] == [case["case"]]
    encoder = CountingEncoder(stage1["tokenizer"])
    with caplog.at_level(logging.INFO, logger="prod9"):
        items = build_token_cache([case], stage1["root"] / "cache", stage1["key"], encoder)
    assert encoder.calls == [] and items == stage1["items"]
    assert "1 reused, 0 encoded" in caplog.text
    info = json.loads((stage1["root"] / "cache" / stage1["key"] / "cache.json").read_text())
    assert info["key"] == stage1["key"] and info["autoencoder_path"] == str(stage1["export"])
    assert info["preprocessing"]["spacing"] == [5.0, 5.0, 5.0]
    assert stage1["tokenizer"].autoencoder_sha256 == file_sha256(stage1["export"])  # the bytes it was built from

    changed = stage1["root"] / "autoencoder_changed.pt"
    data = bytearray(stage1["export"].read_bytes())
    data[len(data) // 2] ^= 1
    changed.write_bytes(bytes(data))
    assert file_sha256(changed) != file_sha256(stage1["export"])
    key = token_cache_key(file_sha256(changed), stage1["tokenizer"].preprocessing, stage1["tokenizer"].settings)
    assert key != stage1["key"] and len(key) == 16
    # The preprocessing contract and the tiling are part of the key too.
    sha = file_sha256(stage1["export"])
    settings = stage1["tokenizer"].settings
    assert token_cache_key(sha, preprocessing_contract([4, 4, 4], [0, 1]), settings) != stage1["key"]
    assert token_cache_key(sha, stage1["tokenizer"].preprocessing) != stage1["key"]
    with pytest.raises(ValueError, match="expected the hex sha256 of the encoder export, got '.*autoencoder.pt'"):
        token_cache_key(str(stage1["export"]), stage1["tokenizer"].preprocessing)  # a path is not a hash
    encoder = CountingEncoder(arrays=stage1["arrays"])
    items = build_token_cache([case], stage1["root"] / "cache", key, encoder)
    assert encoder.calls == [case["case"]] and items[0]["tokens"] != stage1["items"][0]["tokens"]


def test_truncated_file_is_re_encoded_with_a_warning(stage1, caplog, tmp_path):
    cases, arrays = stage1["cases"], stage1["arrays"]
    encoder = CountingEncoder(arrays=arrays)
    items = build_token_cache(cases, tmp_path, "k", encoder)
    assert [item["case"] for item in items] == encoder.calls == [c["case"] for c in cases]  # input order
    path = tmp_path / "k" / f"{cases[1]['case']}.npz"
    assert items[1]["tokens"] == str(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{path.name}: cannot read token cache file"):
        LoadTokensd()({"tokens": str(path)})
    encoder = CountingEncoder(arrays=arrays)
    with caplog.at_level(logging.INFO, logger="prod9"):
        build_token_cache(cases, tmp_path, "k", encoder)
    assert encoder.calls == [cases[1]["case"]]
    assert "unreadable" in caplog.text and path.name in caplog.text and "1 reused, 1 encoded" in caplog.text
    for name, value in load_token_file(path).items():
        np.testing.assert_array_equal(value, arrays[name])
    assert not list(tmp_path.glob("k/.*"))  # no temp files left behind


def _tiny_token_arrays(value: int) -> dict:
    """Arrays a token cache accepts (2^3 token grid, f = 2), every token ``value``."""
    return {"tokens": np.full((4, 2, 2, 2), value), "seg": np.zeros((4, 4, 4), np.uint8),
            "seg_tokens": np.zeros((2, 2, 2), np.uint8), "affine": np.eye(4), "intensity": np.tile([0.0, 1.0], (4, 1))}


def _fake_case(folder, name: str = "BraTS_0001") -> dict:
    """A case dict whose input files exist (their bytes do not matter to the cache, only path, size and mtime)."""
    folder.mkdir(parents=True, exist_ok=True)
    case = {"case": name}
    for key in (*MODALITIES, "seg"):
        case[key] = str(folder / f"{name}_{key}.nii.gz")
        with open(case[key], "wb") as f:
            f.write(key.encode())
    return case


def test_a_changed_input_volume_is_encoded_again(tmp_path, caplog, monkeypatch):
    """The cache key covers the encoder, not the volumes: each file stores its inputs' fingerprint, and a corrected
    volume - or, in a later run, another dataset with the same case names - is encoded again, never reused."""
    from prod9_components.data import case_cache

    case = _fake_case(tmp_path / "data")
    items = build_token_cache([case], tmp_path / "cache", "k", CountingEncoder(arrays=_tiny_token_arrays(1)))
    assert case_cache.stored_fingerprint(items[0]["tokens"]) == case_cache.input_fingerprint(case)
    encoder = CountingEncoder(arrays=_tiny_token_arrays(2))
    build_token_cache([case], tmp_path / "cache", "k", encoder)
    assert encoder.calls == []  # unchanged inputs: reused

    stat = os.stat(case["t2"])
    os.utime(case["t2"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the volume was rewritten
    with caplog.at_level(logging.INFO, logger="prod9"):
        items = build_token_cache([case], tmp_path / "cache", "k", encoder)
    assert encoder.calls == [case["case"]] and "encoded from other input files" in caplog.text
    assert (load_token_file(items[0]["tokens"])["tokens"] == 2).all()

    monkeypatch.setattr(case_cache, "_claimed", {})  # a new run ...
    other = _fake_case(tmp_path / "other_dataset")  # ... on another dataset with the same case name
    encoder = CountingEncoder(arrays=_tiny_token_arrays(3))
    items = build_token_cache([other], tmp_path / "cache", "k", encoder)
    assert encoder.calls == [other["case"]] and (load_token_file(items[0]["tokens"])["tokens"] == 3).all()


def test_two_cases_of_one_name_are_refused(tmp_path):
    first, second = _fake_case(tmp_path / "a"), _fake_case(tmp_path / "b")
    encoder = CountingEncoder(arrays=_tiny_token_arrays(1))
    with pytest.raises(ValueError, match=rf"^case name 'BraTS_0001' is given to two cases \(in {tmp_path / 'a'} and "
                                         rf"{tmp_path / 'b'}\); both would be cached as .*BraTS_0001.npz \(case names "
                                         r"must be unique\)$"):
        build_token_cache([first, second], tmp_path / "cache", "k", encoder)
    assert encoder.calls == []
    build_token_cache([first], tmp_path / "cache", "k", encoder)  # the training split ...
    with pytest.raises(ValueError, match="'BraTS_0001' is given to two cases"):
        build_token_cache([second], tmp_path / "cache", "k", encoder)  # ... and a validation case of the same name
    assert encoder.calls == ["BraTS_0001"]


def test_load_tokens_gives_tensors(stage1):
    out = LoadTokensd()(dict(stage1["items"][0]))
    tokens, seg, seg_tokens = out["tokens"], out["seg"], out["seg_tokens"]
    assert tokens.dtype == torch.int64 and tokens.ndim == 4 and tokens.shape[0] == 4
    assert seg.shape == (1, *(2 * n for n in tokens.shape[1:])) and seg_tokens.dtype == torch.int64
    assert out["affine"].shape == (4, 4) and out["intensity"].shape == (4, 2)


def _arange_sample(grid, f):
    """tokens[c] = cell id + 1000 c, seg_tokens = cell id, seg = each voxel's cell id (image resolution)."""
    cells = np.arange(np.prod(grid)).reshape(grid)
    tokens = np.stack([cells + 1000 * c for c in range(4)])
    seg = cells.repeat(f, 0).repeat(f, 1).repeat(f, 2)[None]
    return {"tokens": torch.from_numpy(tokens), "seg_tokens": torch.from_numpy(cells.copy()),
            "seg": torch.from_numpy(seg)}


def test_rand_token_crop_takes_one_window_for_all_arrays():
    crop = RandTokenCropd((3, 4, 2), downsample_factor=2, pad_token=-1)
    crop.set_random_state(0)
    starts = set()
    for _ in range(8):
        out = crop(_arange_sample((6, 5, 4), 2))
        tokens, seg_tokens, seg = out["tokens"], out["seg_tokens"], out["seg"]
        assert tokens.shape == (4, 3, 4, 2) and seg_tokens.shape == (3, 4, 2) and seg.shape == (1, 6, 8, 4)
        for c in range(4):
            torch.testing.assert_close(tokens[c], seg_tokens + 1000 * c)
        torch.testing.assert_close(seg[0], seg_tokens.repeat_interleave(2, 0).repeat_interleave(2, 1)
                                   .repeat_interleave(2, 2))
        # A contiguous window of the original grid.
        first = int(seg_tokens[0, 0, 0])
        start = np.unravel_index(first, (6, 5, 4))
        np.testing.assert_array_equal(seg_tokens.numpy(), np.arange(120).reshape(6, 5, 4)[
            start[0]:start[0] + 3, start[1]:start[1] + 4, start[2]:start[2] + 2])
        assert out["grid_origin"].tolist() == [int(s) for s in start]  # the window's place in the case grid
        starts.add(start)
    assert len(starts) > 1  # random


def test_token_crop_pads_a_small_grid():
    out = RandTokenCropd((4, 4, 4), downsample_factor=2, pad_token=7)(_arange_sample((2, 5, 4), 2))
    tokens, seg_tokens, seg = out["tokens"], out["seg_tokens"], out["seg"]
    assert tokens.shape == (4, 4, 4, 4) and seg.shape == (1, 8, 8, 8)
    assert (tokens[:, 0] == 7).all() and (tokens[:, 3] == 7).all()  # depth 2 centred in 4
    assert (seg_tokens[0] == 0).all() and (seg[:, :2] == 0).all() and (seg[:, 6:] == 0).all()
    torch.testing.assert_close(tokens[1, 1:3], seg_tokens[1:3] + 1000)
    centre = CenterTokenCropd((4, 4, 4), downsample_factor=2, pad_token=7)(_arange_sample((2, 5, 4), 2))
    expected, _ = pad_or_crop(torch.arange(40).reshape(2, 5, 4), (4, 4, 4), 0)
    torch.testing.assert_close(centre["seg_tokens"], expected)


@pytest.mark.parametrize("size", [(8, 9, 4), (3, 2, 5), (6, 12, 3)])
def test_pad_or_crop_and_restore_round_trip(size):
    grid = np.arange(1, 6 * 7 * 4 + 1).reshape(1, 6, 7, 4)  # values >= 1: 0 marks what restore could not recover
    out, info = pad_or_crop(grid, size, pad_value=0)
    assert out.shape == (1, *size) and info[1] == (6, 7, 4)
    back = restore(out, info, fill=0)
    assert back.shape == grid.shape
    kept = back > 0
    np.testing.assert_array_equal(back[kept], grid[kept])
    # Everything survives on the axes that were padded; a cropped axis loses exactly the cut part.
    assert kept.sum() == np.prod([min(s, n) for s, n in zip(size, (6, 7, 4))])
    assert (out > 0).sum() == kept.sum()
    # torch gives the same; the image-grid version of the same window is the token one scaled by f.
    torch_out, _ = pad_or_crop(torch.from_numpy(grid), size, pad_value=0)
    np.testing.assert_array_equal(torch_out.numpy(), out)
    image = grid.repeat(2, 1).repeat(2, 2).repeat(2, 3)
    image_out, _ = pad_or_crop(image, [2 * s for s in size], 0)
    if all((s - n) % 2 == 0 for s, n in zip(size, (6, 7, 4))):
        np.testing.assert_array_equal(image_out, out.repeat(2, 1).repeat(2, 2).repeat(2, 3))
    np.testing.assert_array_equal(restore(out.repeat(2, 1).repeat(2, 2).repeat(2, 3), scale_crop_info(info, 2), 0),
                                  back.repeat(2, 1).repeat(2, 2).repeat(2, 3))
