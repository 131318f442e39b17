"""The demo restarts itself once with glibc told to keep freed memory in its heap, unless the user set either
variable (then it runs as started)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SHOW = ("import os, sys; sys.path.insert(0, 'scripts'); import demo; demo.keep_freed_memory(); "
        "print(os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ.get('MALLOC_TRIM_THRESHOLD_'))")


def _run(extra: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | extra
    result = subprocess.run([sys.executable, "-c", SHOW], env=env, cwd=ROOT, capture_output=True, text=True,
                            check=True)
    return result.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's variables: Linux only")
def test_restarts_once_with_the_heap_settings_and_respects_the_users():
    mmap, trim = _run({})
    assert (mmap, trim) == (str(2**32), str(2**36))  # set: the process that printed is the restarted one
    assert _run({"MALLOC_TRIM_THRESHOLD_": "1000"}) == ["None", "1000"]  # the user's choice: no restart
