"""Run a stage's MONAI bundle workflow from a ``prod9-train-*`` verb.

Every verb is the bundle workflow ``python -m monai.bundle run`` would execute (no second code path): this module
only picks the config files, turns flags into bundle id overrides and reports errors in one line.

``--config`` takes
- nothing: the stage's bundle in ``bundles/<stage>`` beside the installed package (never a ``bundles/`` folder of the
  working directory: a bundle runs its ``$`` expressions, so only a path the user names may replace it);
- a bundle directory (``bundles/maskgit_stage1``) or its ``configs/train.json``: that bundle;
- a config path of the seed's workflow document (``configs/maskgit/brats/stage1/base.yaml`` ...) that is no file here:
  the bundle it names (:mod:`prod9_components.cli.seed_configs`);
- a config file of one of our bundles (``bundles/maskgit_stage1/configs/tiny.json``): layered on the stage's bundle;
- any other JSON/YAML file: a user's preset, read as data (seed sections or bundle ids,
  :mod:`prod9_components.cli.seed_presets`) and applied before the flags.

Flag and preset values are data: :mod:`prod9_components.cli.literal_flags` keeps MONAI from evaluating them.
"""

from __future__ import annotations

import difflib
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prod9_components.cli.argv import normalise_multi_value_flags
from prod9_components.cli.literal_flags import flag_name, literal_overrides
from prod9_components.cli.seed_configs import seed_config

VERB_CONFIGS = {
    "train": ["train.json"],
    "validate": ["train.json", "evaluate.json"],
    "test": ["train.json", "evaluate.json"],
    "infer": ["train.json", "checkpoint_inference.json"],
    "generate": ["train.json", "checkpoint_inference.json"],
}
# checkpoint_inference.json: the commands' infer/generate, layered on train.json, reading the run's checkpoint record;
# configs/inference.json is the standalone model-zoo config (models/*.pt, prod9_components.zoo.template).


class UsageError(ValueError):
    """A bad flag value or config path, reported in one line."""


def bundles_root() -> Path:
    """The stage bundles installed with the package (package data: ``prod9_components/bundles/<stage>/``)."""
    return Path(__file__).resolve().parents[1] / "bundles"


def config_files(stage: str, verb: str, config: str | None = None) -> tuple[Path, list[str]]:
    """Return ``(bundle_dir, [config files in order])`` for a verb (a user's preset is not among them: see
    :func:`user_preset`)."""
    preset = None
    seed = seed_config(config)
    if config is None or seed is not None:
        if seed is not None and seed.stage != stage:
            raise UsageError(f"--config {config}: the seed's config of bundle {seed.stage}, not of {stage}")
        bundle = bundles_root() / stage
    else:
        path = Path(config)
        if path.is_dir():
            bundle = path
        elif path.is_file() and path.name == "train.json":
            bundle = path.resolve().parent.parent
        elif path.is_file():
            bundle, preset = bundles_root() / stage, path
        else:
            raise UsageError(f"--config {config}: no such bundle directory or config file, nor a config name of the "
                             f"seed's workflows{_closest_seed_name(config)}")
    if not (bundle / "configs" / "train.json").is_file():
        raise UsageError(f"{bundle}: not a bundle (expected {bundle / 'configs' / 'train.json'})")
    files = [str(bundle / "configs" / name) for name in VERB_CONFIGS[verb]]
    if preset is not None and user_preset(config) is None and preset.name == "inference.json":
        # the standalone zoo config: layered on train.json it would replace the verb's own ids
        raise UsageError(f"--config {config}: the standalone model-zoo config, which runs with models/*.pt by "
                         "`python -m monai.bundle run --config_file configs/inference.json` in its folder; the "
                         "commands run configs/checkpoint_inference.json")
    if preset is not None and user_preset(config) is None:  # one of our bundle files: layered as config
        files.append(str(preset))
    return bundle, files


def user_preset(config: str | None) -> Path | None:
    """``--config`` as a user's preset file (read as data), or None: no file, a bundle, or a config file of one of our
    installed bundles (those may hold bundle expressions, like ``tiny.json``'s export path)."""
    if config is None or seed_config(config) is not None:
        return None
    path = Path(config)
    if not path.is_file() or path.name == "train.json":
        return None
    return None if path.resolve().is_relative_to(bundles_root().resolve()) else path


def _closest_seed_name(config: str) -> str:
    import difflib

    from prod9_components.cli.seed_configs import SEED_CONFIGS

    match = difflib.get_close_matches(Path(config).as_posix(), list(SEED_CONFIGS), n=1, cutoff=0.8)
    return f" (closest: {match[0]})" if match else ""


def bundle_ids(bundle: Path) -> Any:
    """Every id any verb of ``bundle`` reads (train, evaluate and inference configs in one parser)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    names = ("train.json", "evaluate.json", "checkpoint_inference.json")
    parser.read_config([str(bundle / "configs" / name) for name in names])
    return parser


def reads_id(ids: Any, key: str) -> bool:
    """A flat id the parser ``ids`` holds; ``a#b`` needs ``a`` to be a mapping of it (a new constructor argument
    ``network_def#use_convtranspose`` is fine, as in the bundles' tiny.json)."""
    if key in ids:
        return True
    parent = key.rpartition("#")[0]
    return bool(parent) and parent in ids and isinstance(ids.get(parent), dict)


def check_flag_ids(overrides: dict[str, Any], ids: Any, where: str, extra: tuple[str, ...] = ()) -> None:
    """Refuse a flag that names no id of the verb's configs: MONAI would add it as a new id nobody reads, so a typo
    (``--learnig-rate``) or a setting another stage has (``--disc-learning-rate`` on a ControlNet) would change nothing.

    Raises:
        UsageError: naming the flag and the closest id.
    """
    for key in overrides:
        if key not in extra and not reads_id(ids, key):
            names = [k for k in ids.get("") or {} if isinstance(k, str) and k != "imports"]
            match = difflib.get_close_matches(key.partition("#")[0], names, n=1, cutoff=0.5)
            closest = f" (closest: {flag_name(match[0])})" if match else ""
            raise UsageError(f"{flag_name(key)}: {where} reads no such setting{closest}; `--help` lists the flags, "
                             "configs/train.json the bundle ids")


def path_list(value) -> list[str] | None:
    """A flag that takes one path or several (fire gives a str or a tuple) as a list of str; None stays None."""
    if value is None:
        return None
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def run_bundle(stage: str, verb: str, config: str | None, overrides: dict[str, Any]) -> Any:
    """Create, run and finalize the bundle workflow; return it so callers can read resolved ids."""
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import create_workflow

    from prod9_components.tracking import tracking_settings

    bundle, files = config_files(stage, verb, config)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    seed, preset = seed_config(config), user_preset(config)
    if preset is not None:  # a user's preset: its values, then the flags
        from prod9_components.cli.seed_presets import preset_overrides

        overrides = {**preset_overrides(preset, bundle_ids(bundle), bundle.name), **overrides}
    if seed is not None:  # the seed's config name: its documented export paths, unless a flag says otherwise
        overrides = {**seed.defaults, **overrides}
    overrides.setdefault("bundle_root", str(bundle))
    defaults = ConfigParser()
    defaults.read_config(files)  # the raw values tell which ids are typed (numbers, lists)
    tracking = tracking_settings(overrides.pop("tracking", None), evaluation=verb in ("validate", "test"))
    if not isinstance(tracking, str):  # a settings file may define ids of its own
        tracking_ids = tuple(tracking["configs"]) if tracking else ()
        check_flag_ids(overrides, defaults, f"{bundle.name} {verb}", extra=tracking_ids)
    overrides = literal_overrides(overrides, defaults)
    with warnings.catch_warnings():
        if all(Path(f).resolve().is_relative_to(bundles_root().resolve()) for f in files):
            # MONAI warns that configs run code: the installed bundles are the package's own code
            warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)
        workflow = create_workflow(config_file=files, meta_file=str(bundle / "configs" / "metadata.json"),
                                   logging_file=str(bundle / "configs" / "logging.conf"), tracking=tracking,
                                   **overrides)
    workflow.run()
    workflow.finalize()
    return workflow


def evaluate_bundle(stage: str, split: str, config: str | None, checkpoint: str | None, output_dir: str | None,
                    overrides: dict[str, Any]) -> None:
    """The ``validate`` / ``test`` verb of any stage: evaluate ``checkpoint`` on ``split`` ("validation" or "test")
    and report where metrics.json went."""
    workflow = run_bundle(stage, "test" if split == "test" else "validate", config,
                          {"output_dir": output_dir, "checkpoint": checkpoint, "split": split,
                           **flag_overrides(overrides)})
    report(f"{split} metrics of {resolved(workflow, 'checkpoint')} written to {resolved(workflow, 'metrics_path')}")


def resolved(workflow: Any, key: str, default: Any = None) -> Any:
    """A resolved id of a finished workflow (e.g. ``output_dir``), or ``default`` when it does not exist."""
    try:
        return workflow.parser.get_parsed_content(key)
    except (KeyError, ValueError):
        return default


def flag_overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``--some-flag value`` arrives as ``some_flag``; bundle ids use underscores, ``#`` passes through."""
    return {key.replace("-", "_") if "#" not in key else key: value for key, value in kwargs.items()}


def one_line(error: BaseException) -> str:
    """The line that names the problem: the first of the message, except for an error re-raised from a DataLoader
    worker ("Caught ValueError in DataLoader worker process 0." + the worker's traceback as text), whose last line is
    the worker's own error (e.g. ``ValueError: <file>: ...``, naming the file)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0] and len(lines) > 1:
        kind, _, text = lines[-1].partition(": ")  # "ValueError: <file>: ..." -> "<file>: ..."
        return text if text and kind.endswith(("Error", "Exception")) else lines[-1]
    return lines[0]


def root_cause(error: BaseException) -> BaseException:
    """MONAI wraps errors raised while evaluating config expressions; the innermost one names the problem."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


def main_for(component: Callable, argv: list[str] | None = None, name_list_flags: tuple[str, ...] = ()) -> None:
    """Console-script entry: normalise multi-value flags, run fire, print one-line errors (``--debug``: traceback)."""
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if any(a in ("-h", "--help") for a in argv):  # fire's own help flag is "-- --help"; "--help" alone would run
        argv = [a for a in argv if a not in ("-h", "--help")] + ["--", "--help"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    if isinstance(component, type):  # an instance: fire's --help then lists the verbs
        component = component()
    try:
        fire.Fire(component, command=normalise_multi_value_flags(argv, name_list_flags))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # one line, naming the problem
        if debug:
            raise
        cause = root_cause(error)
        print(f"error: {one_line(cause)}", file=sys.stderr)
        sys.exit(2)


def report(message: str) -> None:
    """The one closing line every verb prints."""
    print(message, flush=True)


def report_training(workflow: Any, extra: str = "") -> None:
    """The closing line of every ``train`` verb: the stage, the checkpoints it wrote (best.ckpt only exists once a
    validation has run), its logs, then ``extra``; or, when a resumed run had already reached its last epoch, the
    checkpoint handler's sentence that says nothing was trained."""
    handlers = resolved(workflow, "train#handlers", []) or []
    said = [h.nothing_trained for h in handlers if getattr(h, "nothing_trained", None)]
    if said:
        report(said[0])
        return
    out = resolved(workflow, "output_dir")
    written = "best.ckpt, last.ckpt" if (Path(out) / "best.ckpt").is_file() else \
        "last.ckpt; no best.ckpt: no validation ran, it runs every --val-interval epochs"
    report(f"trained {resolved(workflow, 'stage')}: checkpoints in {out}/ ({written}), TensorBoard logs in {out}/logs"
           + extra)

