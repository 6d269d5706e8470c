"""Sizes and durations as a person reads them."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1234 -> '1.2 KiB', 5e8 -> '477 MiB', 3e10 -> '27.9 GiB' (binary units, as `df -h` and the GPU tools use)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(n)} bytes"


def human_seconds(s: float) -> str:
    """7.64 -> '7.6 s', 204 -> '3 min 24 s', 5000 -> '1 h 23 min'."""
    if s < 60:
        return f"{s:.1f} s"
    minutes = round(s) // 60
    if minutes < 60:
        return f"{minutes} min {round(s) % 60} s"
    return f"{minutes // 60} h {minutes % 60} min"
