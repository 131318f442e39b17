"""The seven bundles cannot drift apart: the blocks every bundle shares hold the same value in all of them, and every
checkpoint a config loads is checked for the stage that wrote it.

Why an identity test and not one shared config file: MONAI could merge a common JSON into every bundle (one more
file in the ``--config_file`` list, or ``%../../common.json#id`` macros), but a bundle must stay self-contained for
the model zoo (downloaded alone, run from its own ``configs/``), and a longer file list would change every user's
command. So each bundle keeps its full copy, and this test proves the copies are the same.

Every id that all seven ``train.json`` hold is decided here: shared (:data:`SHARED_IDS`, or a block inside a shared
one) or different on purpose (:data:`DIFFERS`, with the reason). A new common id fails
:func:`test_every_common_train_id_is_decided` until it is put in one of the two.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from tests.helpers import ROOT

BUNDLES = sorted(p.name for p in (ROOT / "bundles").iterdir() if (p / "configs" / "train.json").is_file())

# train.json ids ('#' paths) every bundle holds with one value.
SHARED_IDS = [
    # set-up: where data and outputs are, device, precision, seeding, resuming
    "bundle_root", "dataset_dir", "datalist", "cache_rate", "num_workers", "limit_train_batches", "limit_val_batches",
    "device", "amp", "seed", "resume", "overwrite", "log_dir", "network", "run", "finalize",
    # sliding-window wiring (roi and overlap are the stage's own, see DIFFERS)
    "sw_batch_size", "sw_config#_target_", "sw_config#mode", "sw_config#sw_batch_size",
    # datasets and loaders
    "train#dataset#data", "train#dataset#transform", "train#dataset#cache_rate", "train#dataset#num_workers",
    "train#dataloader#_target_", "train#dataloader#batch_size", "train#dataloader#dataset",
    "train#dataloader#num_workers", "train#dataloader#pin_memory", "train#dataloader#shuffle",
    "validate#dataset#data", "validate#dataset#transform", "validate#dataset#cache_rate",
    "validate#dataset#num_workers", "validate#dataloader", "validate#split",
    # engine wiring
    "optimizer#lr", "optimizer#fused",
    "train#trainer#amp", "train#trainer#device", "train#trainer#epoch_length", "train#trainer#max_epochs",
    "train#trainer#network", "train#trainer#optimizer", "train#trainer#train_data_loader",
    "train#trainer#train_handlers",
    "validate#evaluator#amp", "validate#evaluator#device", "validate#evaluator#val_data_loader",
    "validate#evaluator#val_handlers",
]

# train.json ids all bundles hold with values that differ on purpose.
DIFFERS = {
    "stage": "the bundle's own name, stored in its checkpoints",
    "output_dir": "each stage writes its own folder",
    "epochs": "each stage's training length",
    "batch_size": "what fits a stage's volume (images) or token/latent grid",
    "learning_rate": "each network's own rate",
    "val_interval": "MAISI stages 2 and 3 validate by sampling the rectified flow: every 10 epochs, not 5",
    "roi_size": "stage 1 sets its window, later stages take the upstream export's",
    "spacing": "stage 1 sets it, later stages take the upstream export's preprocessing contract",
    "intensity_range": "stage 1 sets it, later stages take the upstream export's preprocessing contract",
    "splits": "stage 1 also sizes cases for its network's downsampling and MS-SSIM",
    "sw_config#roi_size": "stage 1 names its own roi_size, later stages the upstream export's window",
    "sw_config#overlap": "as sw_config#roi_size",
    "imports": "each bundle imports what it uses (the common first lines: test_train_imports_start_alike)",
    "initialize": "stage 3 first checks its upstream files' hashes (test_initialize_seeds_last)",
    "network_def": "the stage's network",
    "optimizer#_target_": "Adam for the GAN stages (as MONAI's autoencoder tutorials), AdamW for transformers/UNets",
    "optimizer#params": "ControlNets train only their own (unfrozen) parameters",
    # (no commit gives a reason; this is the one the numbers suggest: worth revisiting)
    "train#dataloader#drop_last": "MaskGiT stages batch 4 and keep a short last batch (dropping it loses up to 3 "
                                  "cases an epoch); the batch-2 image/latent stages drop it",
    "train#dataset#_target_": "a CacheDataset of the items; MAISI stage 3's items (one per case x target) share "
                              "their case's cached preprocessing (data.ControlDataset)",
    "validate#dataset#_target_": "as train#dataset#_target_",
    "train#items": "images, tokens or latents",
    "train#transforms": "images, tokens or latents",
    "train#trainer#_target_": "the stage's trainer",
    "train#handlers": "shared handler blocks: test_shared_train_handlers",
    "validate#items": "images, tokens or latents",
    "validate#transforms": "images, tokens or latents",
    "validate#evaluator#_target_": "the stage's evaluator",
    "validate#evaluator#key_val_metric": "stage 1 keeps the best PSNR, the others the lowest val_loss",
    "validate#evaluator#network": "MAISI stage 2 validates its EMA weights",
    "validate#handlers": "shared handler blocks: test_shared_validate_handlers",
}

SHARED_IMPORTS = ["$import os", "$import prod9_components.bundle_errors", "$import torch", "$import monai", "$import prod9_components.data as data",
                  "$import prod9_components.networks.export as export"]
SEEDING = "$monai.utils.set_determinism(seed=@seed)"

# Handler blocks in every train#handlers, by _target_: the keys all bundles share (None: the whole block). The keys
# left out differ on purpose: NaNGuard's loss_keys (the GAN stages also guard disc_loss); the checkpoint's network
# (MAISI stage 2 keeps its EMA weights), key_metric/mode, preprocessing (stage 1's own contract, later stages the
# upstream export's), save_dict (what each trainer needs to resume), extra (the record fields of the stage),
# export_path (stage 1 only); the losses each stage logs and shows.
TRAIN_HANDLERS = {
    "prod9_components.handlers.epoch_seed.EpochSeed": None,
    "prod9_components.handlers.nan_guard.NaNGuard": ["_target_"],
    "ValidationHandler": None,
    "prod9_components.handlers.checkpoint.CheckpointHandler": ["_target_", "output_dir", "evaluator", "stage",
                                                               "resume", "splits"],
    "StatsHandler": None,
    "prod9_components.handlers.tensorboard_stats.TensorBoardStatsHandler": ["_target_", "log_dir", "tag_name"],
    "prod9_components.handlers.progress.ProgressBarHandler": ["_target_", "desc"],
}
VALIDATE_HANDLERS = {
    "StatsHandler": None,
    "prod9_components.handlers.tensorboard_stats.TensorBoardStatsHandler": None,
}
LR_SCHEDULE_HANDLER = "LrScheduleHandler"

# evaluate.json: ids every bundle holds with one value, and its metrics writer's shared keys (``extra`` holds the
# settings a stage's metrics depend on).
EVALUATE_SHARED_IDS = ["checkpoint", "split", "metrics_path", "record", "validate#split", "run", "finalize"]
EVALUATE_HANDLERS = {
    "prod9_components.handlers.progress.ProgressBarHandler": None,
    "prod9_components.handlers.metrics_json.MetricsJSONWriter": ["_target_", "output_path", "overwrite", "split",
                                                                 "checkpoint"],
}
# checkpoint_inference.json: the commands' infer/generate (the standalone inference.json: test_inference_templates)
CHECKPOINT_INFERENCE_SHARED_IDS = ["checkpoint", "record", "finalize"]
TINY_SHARED_IDS = ["limit_train_batches", "limit_val_batches", "num_workers", "val_interval"]
# multi_gpu_train.json: everything but the stage-1 GAN's extra DDP wrappers is the same DDP wiring in all bundles.
MULTI_GPU_OWN_IDS = {"discriminator", "preprocessing", "validate#metrics#codebook_usage#metric_fn#codebook_size",
                     "validate#metrics#perplexity#metric_fn#codebook_size"}

LOADERS = {"load_record", "read_record", "load_network"}


def read(bundle: str, name: str = "train.json") -> dict:
    return json.loads((ROOT / "bundles" / bundle / "configs" / name).read_text())


def lookup(config: dict, id_: str):
    """The value at a '#' path of a nested config; KeyError if a bundle lacks it."""
    value = config
    for key in id_.split("#"):
        value = value[key]
    return value


def nested_ids(config: dict, prefix: str = "") -> dict:
    """Every '#' path of a nested config -> its value (dicts and their members alike)."""
    ids = {}
    for key, value in config.items():
        ids[prefix + key] = value
        if isinstance(value, dict):
            ids.update(nested_ids(value, f"{prefix}{key}#"))
    return ids


def assert_same(values: dict, what: str) -> None:
    """``values``: bundle -> value; one value for all, or a message listing which bundles hold which."""
    groups: dict[str, list[str]] = {}
    for bundle, value in values.items():
        groups.setdefault(json.dumps(value, sort_keys=True), []).append(bundle)
    assert len(groups) == 1, f"{what} differs between bundles:\n" + "\n".join(
        f"  {', '.join(bundles)}: {value}" for value, bundles in groups.items())


def handler_blocks(handlers: list) -> dict:
    """_target_ -> block of a handler list (references such as '@validate#samples' are skipped)."""
    return {h["_target_"]: h for h in handlers if isinstance(h, dict)}


def test_all_seven_bundles_are_compared():
    assert len(BUNDLES) == 7, BUNDLES


@pytest.mark.parametrize("id_", SHARED_IDS)
def test_shared_train_ids_are_identical(id_):
    assert_same({b: lookup(read(b), id_) for b in BUNDLES}, f"train.json '{id_}'")


def test_every_common_train_id_is_decided():
    """An id all seven train.json hold is shared (or inside a shared block), a container of decided ids, or differs
    on purpose with a reason."""
    ids = [nested_ids(read(b)) for b in BUNDLES]
    common = set.intersection(*(set(i) for i in ids))
    decided = set(SHARED_IDS) | set(DIFFERS)
    undecided = [i for i in sorted(common)
                 if not any(i == d or i.startswith(d + "#") for d in decided)  # a shared block's members
                 and not all(isinstance(c[i], dict) for c in ids)]  # a container: its members are decided
    assert not undecided, (f"in every train.json but neither in SHARED_IDS nor DIFFERS of {Path(__file__).name}: "
                           f"{undecided}")
    assert not set(SHARED_IDS) & set(DIFFERS)
    assert set(DIFFERS) <= common, f"DIFFERS names ids not in every train.json: {sorted(set(DIFFERS) - common)}"


def test_train_imports_start_alike():
    for bundle in BUNDLES:
        assert read(bundle)["imports"][:len(SHARED_IMPORTS)] == SHARED_IMPORTS, bundle


def test_initialize_seeds_last():
    """Seeding is the last step before the run, in training and evaluation alike (stage 3 checks hashes first)."""
    for bundle in BUNDLES:
        for name in ("train.json", "evaluate.json", "multi_gpu_train.json"):
            steps = read(bundle, name)["initialize"]
            assert steps[-1] == SEEDING and steps.count(SEEDING) == 1, (bundle, name, steps)


def test_multi_gpu_initialize_keeps_the_training_steps():
    """multi_gpu_train.json replaces train.json's initialize: it must keep every step of it after the DDP set-up (a
    dropped upstream-hash check would let a multi-GPU stage 3 train on a changed export)."""
    setups = {}
    for bundle in BUNDLES:
        steps, own = read(bundle, "multi_gpu_train.json")["initialize"], read(bundle)["initialize"]
        assert steps[len(steps) - len(own):] == own, bundle
        setups[bundle] = steps[:len(steps) - len(own)]
    assert_same(setups, "multi_gpu_train.json DDP set-up")


def test_multi_gpu_wiring_is_identical():
    configs = {b: read(b, "multi_gpu_train.json") for b in BUNDLES}
    for id_ in set.union(*(set(c) for c in configs.values())) - MULTI_GPU_OWN_IDS - {"initialize"}:
        assert_same({b: c.get(id_) for b, c in configs.items()}, f"multi_gpu_train.json '{id_}'")


def test_shared_train_handlers():
    """The shared handler blocks (and the shared keys of the others) are in every bundle, in one order: the epoch
    seed first, the NaN guard before validation and checkpoints so a diverged step is never saved."""
    lists = {b: read(b)["train"]["handlers"] for b in BUNDLES}
    for target, keys in TRAIN_HANDLERS.items():
        blocks = {b: handler_blocks(h).get(target) for b, h in lists.items()}
        assert all(blocks.values()), f"{target} missing in {[b for b, v in blocks.items() if not v]}"
        assert_same({b: v if keys is None else {k: v.get(k) for k in keys} for b, v in blocks.items()}, target)
    assert_same({b: [t for t in handler_blocks(h) if t in TRAIN_HANDLERS] for b, h in lists.items()},
                "train#handlers order")
    for bundle, handlers in lists.items():
        nan_guard = handler_blocks(handlers)["prod9_components.handlers.nan_guard.NaNGuard"]
        assert "loss" in nan_guard["loss_keys"], bundle


def test_lr_schedule_wiring_is_identical_where_used():
    """A bundle with an lr_scheduler steps it per iteration with the one LrScheduleHandler block and resumes it from
    last.ckpt; a bundle without one has no handler for it."""
    users = {}
    for bundle in BUNDLES:
        config = read(bundle)
        blocks = handler_blocks(config["train"]["handlers"])
        handler = blocks.get(LR_SCHEDULE_HANDLER)
        if config.get("lr_scheduler") is None:
            assert handler is None, bundle
            continue
        checkpoint = blocks["prod9_components.handlers.checkpoint.CheckpointHandler"]
        assert checkpoint["save_dict"].get("lr_scheduler") == "@lr_scheduler", bundle
        users[bundle] = {"lr_scheduler": config["lr_scheduler"], "handler": handler}
    assert len(users) >= 2, users  # the two stage-1 bundles
    assert_same(users, "lr schedule wiring")


def test_shared_validate_handlers():
    lists = {b: read(b)["validate"]["handlers"] for b in BUNDLES}
    for target in VALIDATE_HANDLERS:
        assert_same({b: handler_blocks(h).get(target) for b, h in lists.items()}, f"validate#handlers {target}")


def test_shared_evaluate_ids_and_metrics_writer():
    configs = {b: read(b, "evaluate.json") for b in BUNDLES}
    for id_ in EVALUATE_SHARED_IDS:
        assert_same({b: c[id_] for b, c in configs.items()}, f"evaluate.json '{id_}'")
    for target, keys in EVALUATE_HANDLERS.items():
        blocks = {b: handler_blocks(c["validate#handlers"])[target] for b, c in configs.items()}
        assert_same({b: v if keys is None else {k: v.get(k) for k in keys} for b, v in blocks.items()}, target)


def test_shared_inference_and_tiny_ids():
    for name, ids in (("checkpoint_inference.json", CHECKPOINT_INFERENCE_SHARED_IDS), ("tiny.json", TINY_SHARED_IDS)):
        configs = {b: read(b, name) for b in BUNDLES}
        for id_ in ids:
            assert_same({b: c[id_] for b, c in configs.items()}, f"{name} '{id_}'")


# -- every checkpoint a config loads is checked for its stage ---------------------------------------------------------

def expressions(value):
    """Every '$' expression string in a config value, recursively."""
    if isinstance(value, str):
        if value.startswith("$"):
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from expressions(v)
    elif isinstance(value, list):
        for v in value:
            yield from expressions(v)


def parse_expression(expression: str) -> ast.Module:
    """A config expression (or '$import' statement) as Python: '@id#sub' becomes the name 'REF__id__sub'."""
    return ast.parse(re.sub(r"@([\w#]+)", lambda m: "REF__" + m.group(1).replace("#", "__"), expression[1:]))


def loader_calls():
    """(bundle, config file, top-level id, call node) of every load_record/read_record/load_network in a config."""
    calls = []
    for bundle in BUNDLES:
        for path in sorted((ROOT / "bundles" / bundle / "configs").glob("*.json")):
            for id_, value in json.loads(path.read_text()).items():
                for expression in expressions(value):
                    for node in ast.walk(parse_expression(expression)):
                        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) \
                                in LOADERS:
                            calls.append((bundle, path.name, id_, node))
    return calls


def stages_argument(call: ast.Call) -> ast.expr | None:
    return {k.arg: k.value for k in call.keywords}.get("stages")


CALLS = loader_calls()


def test_configs_load_checkpoints_only_through_the_stage_checked_loaders():
    assert len(CALLS) >= 20, len(CALLS)  # every evaluate/inference record and every upstream export
    for path in (ROOT / "bundles").glob("*/configs/*.json"):
        assert "torch.load" not in path.read_text(), f"{path}: load records with export.load_record(..., stages=...)"


@pytest.mark.parametrize("bundle, name, id_, call", CALLS, ids=[f"{b}/{n}:{i}" for b, n, i, _ in CALLS])
def test_every_checkpoint_load_names_its_stages(bundle, name, id_, call):
    """``stages=`` is given, as a list of the bundle's own stage (@stage) or of other bundles' names."""
    stages = stages_argument(call)
    assert isinstance(stages, (ast.List, ast.Tuple)) and stages.elts, f"{bundle}/{name} '{id_}' loads without stages="
    for element in stages.elts:
        own = isinstance(element, ast.Name) and element.id == "REF__stage"
        other = isinstance(element, ast.Constant) and element.value in BUNDLES
        assert own or other, f"{bundle}/{name} '{id_}': {ast.unparse(element)} is neither @stage nor a bundle name"


@pytest.mark.parametrize("bundle, name, id_, call", CALLS, ids=[f"{b}/{n}:{i}" for b, n, i, _ in CALLS])
def test_every_checkpoint_load_refuses_another_stage(bundle, name, id_, call, tmp_path):
    """The config itself, parsed as MONAI runs it, refuses a record of another stage and takes one of its own."""
    path_id = call.args[0].id.removeprefix("REF__")  # the id naming the file: @checkpoint, @autoencoder_path, ...
    argument, own = stages_argument(call), read(bundle)["stage"]
    stages = [own if isinstance(e, ast.Name) else e.value for e in argument.elts] if argument else [own]
    files = [str(ROOT / "bundles" / bundle / "configs" / n) for n in dict.fromkeys(["train.json", name])]
    for stage, refused in (("another_stage", True), (stages[0], False)):
        record = tmp_path / f"{stage}.ckpt"
        torch.save({"format": "prod9-network", "version": 1, "stage": stage}, record)
        parser = ConfigParser()
        parser.read_config(files)
        parser[path_id] = str(record)
        if refused:
            with pytest.raises(RuntimeError) as error:
                parser.get_parsed_content(id_)
            assert f"{record}: a 'another_stage' checkpoint, expected one of {', '.join(stages)}" == \
                str(error.value.__cause__)
        else:
            loaded = parser.get_parsed_content(id_)
            assert (loaded[0] if isinstance(loaded, tuple) else loaded)["stage"] == stage


SAMPLING_BUNDLES = ["maisi_stage2_diffusion", "maisi_stage3_controlnet", "maskgit_stage2_incontext",
                    "maskgit_stage2_label", "maskgit_stage3_controlnet"]


@pytest.mark.parametrize("bundle", SAMPLING_BUNDLES)
def test_sample_during_validation_is_read_as_true_or_false(bundle):
    """``monai.bundle run --sample_during_validation false`` hands the config the string "false", which a bare
    ``$... if @sample_during_validation`` took as true; every use goes through ``validation_sampling``."""
    configs = ROOT / "bundles" / bundle / "configs"
    assert (configs / "train.json").read_text().count("@sample_during_validation") == 1  # inside validation_sampling
    assert "@sample_during_validation" not in (configs / "evaluate.json").read_text()
    for given, expected in [("false", False), ("False", False), (False, False), ("true", True), (True, True)]:
        parser = ConfigParser()
        parser.read_config(ROOT / "bundles" / bundle / "configs" / "train.json")
        parser["sample_during_validation"] = given
        assert parser.get_parsed_content("validation_sampling") is expected, given
    parser["sample_during_validation"] = "maybe"
    with pytest.raises(RuntimeError) as error:  # MONAI wraps an expression's error
        parser.get_parsed_content("validation_sampling", lazy=False)
    assert str(error.value.__cause__) == "sample_during_validation must be true or false, got 'maybe'"
