"""Human units for bytes, FLOPs and seconds: one place, so every table and diff agrees."""

from __future__ import annotations

from typing import Callable

__all__ = ["human_bytes", "human_flops", "human_seconds", "signed", "parse_bytes"]

_BINARY = [("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)]
_DECIMAL = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "kB": 10**3}


def human_bytes(n: float) -> str:
    for unit, size in _BINARY:
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def human_flops(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}FLOP"
    return f"{int(n)} FLOP"


def human_seconds(s: float) -> str:
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(s) >= size:
            return f"{s / size:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def signed(delta: float, fmt: Callable[[float], str] | None = None) -> str:
    """'+1.2 MiB' / '-3 B' / '0': the sign carries the meaning in a diff."""
    f = fmt or (lambda v: f"{v:g}")
    if delta == 0:
        return "0"
    return ("+" if delta > 0 else "-") + f(abs(delta))


def parse_bytes(text: str) -> int:
    """'40GiB', '40 GB', '512MiB', '1000000' → bytes. Raises ValueError with the accepted forms."""
    t = text.strip().replace(" ", "")
    for unit, size in [*_BINARY, *_DECIMAL.items()]:
        if t.endswith(unit):
            number = t[: -len(unit)]
            break
    else:
        number, size = (t[:-1], 1) if t.endswith("B") else (t, 1)
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 40GiB, 80GB, 512MiB or a byte count") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value * size)
