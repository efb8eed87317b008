"""A vector as text: base64 of its float32 values in little-endian byte order, on any machine.
The `ffv check` baseline keeps each vector this way, so that a JSON file can say how far a
vector moved. Pure Python (no torch)."""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Sequence


def encode_vector(values: Sequence[float]) -> str:
    """The values as base64 text of float32 little-endian bytes."""
    data = array("f", values)
    if sys.byteorder == "big":
        data.byteswap()
    return base64.b64encode(data.tobytes()).decode("ascii")


def decode_vector_text(text: str, where: str, error: type[Exception] = ValueError) -> list[float]:
    """The values of encode_vector's text; `error`, starting with `where` (the file and field
    the text came from), if it is not base64 or not a whole number of float32 values."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as err:
        raise error(f"{where} is not base64 ({err})") from err
    if len(raw) % 4:
        raise error(f"{where} holds {len(raw)} bytes, not a whole number of float32 values")
    data = array("f")
    data.frombytes(raw)
    if sys.byteorder == "big":
        data.byteswap()
    return data.tolist()
