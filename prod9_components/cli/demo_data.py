"""``prod9-demo-data``: write the synthetic BraTS-layout demo dataset (see prod9_components.data.demo)."""

from __future__ import annotations

import logging
import sys
import time

import fire

from prod9_components.cli.argv import normalise_multi_value_flags
from prod9_components.data.demo import BRATS_SHAPE, make_demo_dataset


def demo_data(*, output: str, num_cases: int = 8, seed: int = 0, shape: tuple[int, int, int] = BRATS_SHAPE) -> None:
    """Write a synthetic BraTS 2021-layout dataset built from the MNI152 anatomy shipped with nilearn.

    Each case is BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz (seg labels 0, 1 necrotic
    core, 2 oedema, 4 enhancing) on a 240x240x155 mm field of view. OUTPUT must be new, empty, or a folder this
    command made (marked by its prod9_demo.json): there complete cases are reused and a re-run only fills in
    missing cases; nothing in OUTPUT is deleted or replaced.

    Args:
        output: directory to write the cases into (created if missing).
        num_cases: number of cases.
        seed: random seed; the same seed gives the same volumes.
        shape: voxels per axis, e.g. --shape 240 240 155 (1 mm, the BraTS grid) or --shape 48 48 32
            (5 mm, for quick tests); the spacing is 240/X, 240/Y, 155/Z mm.
    """
    shape_tuple = tuple(int(n) for n in (shape if isinstance(shape, (list, tuple)) else [shape]))
    if len(shape_tuple) != 3:
        raise ValueError(f"--shape needs 3 sizes (e.g. --shape 240 240 155), got {shape!r}")
    start = time.perf_counter()
    case_dirs = make_demo_dataset(output, num_cases=int(num_cases), seed=int(seed), shape=shape_tuple)
    seconds = time.perf_counter() - start
    print(
        f"prod9-demo-data: wrote {len(case_dirs)} cases of shape {list(shape_tuple)} (seed {seed}) to {output} "
        f"in {seconds:.1f} s"
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``prod9-demo-data --output DIR --num-cases N --seed S [--shape X Y Z]``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = normalise_multi_value_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        fire.Fire(demo_data, command=args, name="prod9-demo-data")
    except (ValueError, OSError) as error:  # e.g. a folder of the user's: one line naming it, no traceback
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
