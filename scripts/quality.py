#!/usr/bin/env python
"""The quality table: every stage's test-split scores on the demo data beside their trivial baselines.

Runs the CPU demo (``scripts/demo.py``: all seven stages, tiny configs, 4 mm, a stated number of training steps per
stage) unless ``--reuse`` is given, then turns its ``summary.json`` into ``benchmarks/quality.json`` and
``benchmarks/quality.md`` (stage, budget, steps, metric, value, baseline, margin, verdict) and copies the demo's
sheets into ``docs/demo/`` (PNG, under 300 KB each) for the README. Losing rows are kept: the table says where a model
does not beat what learns nothing.

    python scripts/quality.py            # the demo: 15-40 min on 2 CPU cores, by their speed
    python scripts/quality.py --reuse    # tabulate an existing outputs/demo/summary.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
# scripts/ is not a package; the demo states its bars once
from demo import STAGES, target_text  # noqa: E402
MAX_PNG_BYTES = 300_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("outputs/demo"), help="the demo's output folder")
    parser.add_argument("--reuse", action="store_true", help="do not run the demo: read its summary.json")
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "quality",
                        help="writes <table>.json and <table>.md (default benchmarks/quality)")
    parser.add_argument("--sheets", type=Path, default=ROOT / "docs" / "demo", help="where the sheets are copied")
    args = parser.parse_args()
    if not args.reuse:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--output-dir", str(args.demo_dir)],
                       check=True)
    summary_path = args.demo_dir / "summary.json"
    if not summary_path.is_file():
        sys.exit(f"quality: {summary_path} not found: run the demo first (or drop --reuse)")
    summary, rows, table = read_summary(summary_path)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.with_suffix(".json").write_text(json.dumps({"machine": summary["machine"],
                                                            "spacing_mm": summary["spacing_mm"],
                                                            "demo_seconds": summary["seconds"], "rows": rows},
                                                           indent=2) + "\n")
    args.table.with_suffix(".md").write_text(table)
    for stage in summary["stages"]:  # the demo draws <stage>.png in its folder (a summary's paths are not followed)
        sheet = f"{stage['stage']}.png"
        copy_sheet(args.demo_dir / sheet, args.sheets / sheet)
    losing = [r for r in rows if not r["passes"]]
    print(f"wrote {args.table.with_suffix('.json')}, {args.table.with_suffix('.md')} and {len(summary['stages'])} "
          f"sheet(s) to {args.sheets}; {len(losing)} of {len(rows)} rows lose to their baseline")
    return 0


def read_summary(path: Path) -> tuple[dict, list[dict], str]:
    """The demo's ``summary.json``, its rows and its markdown table, all made before anything is written; anything
    else (a hand-edited file, another program's JSON, a stage the demo does not have) stops with one line."""
    try:
        summary = json.loads(path.read_text())
        unknown = [stage["stage"] for stage in summary["stages"] if stage["stage"] not in {s.name for s in STAGES}]
        if unknown:
            raise ValueError(f"stage {unknown[0]!r} is not one of the demo's")
        rows = table_rows(summary)
        return summary, rows, markdown(summary, rows)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        sys.exit(f"quality: {path} is not a demo summary ({type(error).__name__}: {error}); run the demo again")


def table_rows(summary: dict) -> list[dict]:
    """One row per stage x headline score."""
    return [{"stage": stage["stage"], "train_seconds": round(stage["train_seconds"], 1), "steps": stage["steps"],
             "num_cases": stage["num_cases"], **score}
            for stage in summary["stages"] for score in stage["scores"]]


def conditioning_scales(summary: dict) -> str:
    """The scale each ControlNet's `test` ran with, as the run recorded it (a summary older than the record: not
    recorded)."""
    return ", ".join(f"{stage['stage'].split('_')[0]} {stage.get('conditioning_scale', 'not recorded')}"
                     for stage in summary["stages"] if stage["stage"].endswith("controlnet")) or "(none run)"


def markdown(summary: dict, rows: list[dict]) -> str:
    machine = summary["machine"]
    lines = [
        "# Quality on the demo data",
        "",
        f"`python scripts/quality.py` ({summary['seconds'] / 60:.1f} min for all seven stages on {machine['cores']} "
        f"cores of {machine['cpu'] or 'an unnamed CPU'}{matmul_speed(machine)}{side_by_side(machine)}, torch "
        f"{machine['torch']}, "
        f"{machine['device']}): each stage "
        f"trains its bundle's `tiny.json` on the embedded demo dataset at {summary['spacing_mm']:g} mm for the steps "
        "shown, then `test` scores the test split: the demo split's test case and the further cases `--test-cases` "
        "adds, which no stage saw before (`test cases`: the cases the stage's `test` read, its `num_cases`). The "
        "baseline column is what the model must beat (DESIGN §9): the input pooled by the autoencoder's factor, the "
        "best of three source-intensity maps for a translation; for generation half the intensity W1 of the same "
        "network untrained (one training step at learning rate 0, tested alike), and the real data's own scores; "
        "the segmenter's Dice on real images for mask control (the model passes at `need` x the baseline). A "
        "stage-1 model must clear pooling by "
        "the margin shown (`+ 3`: a model that only ties pooling has barely learned). The ControlNets were tested "
        f"and sampled at conditioning scale {conditioning_scales(summary)}. Rows where the model loses are kept.",
        "",
        "| stage | train s | steps | test cases | metric | value | baseline | baseline value | margin | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['train_seconds']:.0f} | {r['steps']} | {r['num_cases']} | "
                     f"{r['metric']} | "
                     f"{r['value']:.3f} | {r['baseline']} | {target_text(r)} | "
                     f"{r['margin']:+.3f} | "
                     f"{'beats' if r['passes'] else '**loses**'} |")
    return "\n".join(lines) + "\n"


def matmul_speed(machine: dict) -> str:
    """`` (float32 matmul 35 GFLOP/s a thread)`` as the demo measured it after its run (CPUs of one name differ
    severalfold), ``""`` in a summary from before the record."""
    speed = machine.get("matmul_gflops_per_thread")
    return f" (float32 matmul {speed:.0f} GFLOP/s a thread)" if speed else ""


def side_by_side(machine: dict) -> str:
    """``, the two families side by side (1 thread each)`` where the demo ran them so (``--jobs``), else ``""``."""
    threads = machine["torch_threads"]
    return (f", the two families side by side ({threads} thread{'s' if threads > 1 else ''} each)"
            if machine.get("jobs", 1) > 1 else "")


def copy_sheet(source: Path, target: Path) -> None:
    """Copy a sheet; one over the size limit is re-encoded with a 64-grey palette (and halved if still too big)."""
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    image = Image.open(source).convert("RGB")
    while target.stat().st_size > MAX_PNG_BYTES:
        image.quantize(colors=64).save(target, optimize=True)
        image = image.resize((image.width // 2, image.height // 2))


if __name__ == "__main__":
    sys.exit(main())
