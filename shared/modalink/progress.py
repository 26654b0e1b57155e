"""Progress bars that stay readable in logs: live on a terminal, one line every 30 s otherwise."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(*args, **kwargs) -> tqdm:
    kwargs.setdefault("mininterval", 0.5 if sys.stderr.isatty() else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(*args, **kwargs)
