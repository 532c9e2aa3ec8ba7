"""Byte sizes as users write them: ``8GiB``, ``"512 MB"``, ``1 << 30`` or ``None`` (no limit)."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str | None, name: str = "size") -> int | None:
    """Parse a budget into bytes; ``None`` stays ``None`` (no limit).

    Args:
        value: an int (bytes), or a string such as ``"64MiB"``, ``"1.5 GiB"``, ``"800MB"``.
        name: the argument's name, used in the error message.

    Raises:
        ValueError: unparseable, negative or non-integral sizes, naming ``name`` and the value.

    >>> parse_bytes("64MiB"), parse_bytes("1.5k"), parse_bytes(None)
    (67108864, 1500, None)
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a size; give bytes as an int or e.g. '8GiB'")
    if isinstance(value, (int, float)):
        if value != value or value < 0 or value in (float("inf"),):
            raise ValueError(f"{name}={value!r} must be a non-negative number of bytes, or None "
                             "for no limit")
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        unit = m and _UNITS.get(m.group(2).lower())
        if m is None or unit is None:
            raise ValueError(f"{name}={value!r} is not a size; write e.g. '8GiB', '512MiB', "
                             "'800MB' or an int of bytes (units: B, KB, MB, GB, TB, KiB, MiB, "
                             "GiB, TiB)")
        return int(float(m.group(1)) * unit)
    raise ValueError(f"{name}={value!r} ({type(value).__name__}) is not a size; give an int of "
                     "bytes, a string like '8GiB', or None")
