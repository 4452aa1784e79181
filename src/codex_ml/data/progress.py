"""Progress bars of the long data stages: on stderr, on a terminal only, on rank 0 only.

``CODEX_ML_PROGRESS=0`` turns them off everywhere, ``CODEX_ML_PROGRESS=1`` shows them without a terminal too
(in a log file); unset, tqdm decides by whether stderr is a terminal. Processes of rank > 0 (``RANK``, as
torchrun sets it) never show one, so a multi-process run draws one bar, not one per process.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

PROGRESS_ENV = "CODEX_ML_PROGRESS"


def progress_bar(desc: str, total: int | None = None, unit: str = "B") -> tqdm:
    """A bar counting ``unit`` (bytes by default, scaled: kB, MB) towards ``total``, with its rate and ETA."""
    setting = os.environ.get(PROGRESS_ENV, "")
    rank = os.environ.get("RANK", "0")
    if setting == "0" or rank not in ("", "0"):
        disable: bool | None = True
    elif setting == "1":
        disable = False
    else:
        disable = None  # tqdm: shown when stderr is a terminal
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024, disable=disable, file=sys.stderr)
