"""Which source frame backs each output frame: forward, then backward, period 2N (MuseTalk's frame cycle)."""

from __future__ import annotations

import numpy as np


def cycle_indices(n_source: int, n_output: int) -> np.ndarray:
    """Source index for each output frame: 0,1,…,N−1,N−1,…,0,0,1,… (each end frame shown twice, as
    MuseTalk's ``frames + frames[::-1]`` does)."""
    if n_source <= 0:
        raise ValueError("the avatar has no frames")
    period = np.concatenate([np.arange(n_source), np.arange(n_source)[::-1]])
    return period[np.arange(n_output) % (2 * n_source)]
