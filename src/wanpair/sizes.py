"""Sizes as a person reads them."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1234 -> '1.2 KiB', 5e8 -> '477 MiB', 3e10 -> '27.9 GiB' (binary units, as `df -h` and the GPU tools use)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(n)} bytes"
