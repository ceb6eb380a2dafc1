"""Numbers as people read them: 12.3M, 1.2 kB, +0.012 (one helper each, used by every table)."""

from __future__ import annotations


def human(n: float) -> str:
    """1234 -> '1,234'; 12_345_678 -> '12.3M'."""
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f}B"
    if abs(n) >= 1e7:
        return f"{n / 1e6:.1f}M"
    return f"{n:,.0f}"


def human_bytes(n: float) -> str:
    """1234 -> '1.2 kB' (powers of 1000, as disk sizes are sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def signed(value: float | None, digits: int = 4) -> str:
    """+0.0123 / −: a difference with its sign, "—" when there is none; never "-0.0000"."""
    return "—" if value is None else f"{round(value, digits) + 0.0:+.{digits}f}"
