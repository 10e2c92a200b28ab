"""PEAK_RAM_KB is a job's own peak (musetalk_engine.metrics.PeakRss), not the process's lifetime peak."""

from __future__ import annotations

import time

from musetalk_engine.metrics import PeakRss

MIB = 1024


def test_each_block_reports_its_own_peak():
    with PeakRss() as big:
        block = bytearray(300 * MIB * 1024)  # 300 MiB, touched (zero-filled) so it is resident
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(0.2)
        during = big.peak_kb
        del block
    with PeakRss() as small:
        time.sleep(0.2)
    assert during is not None and small.peak_kb is not None
    assert big.peak_kb >= small.peak_kb + 250 * MIB  # the second job does not inherit the first one's peak
