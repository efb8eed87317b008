"""Content hashes of vector files and basis directories: what a results file records as the
vector it was patched with, and what `ffv leaderboard --run` compares before reusing a run.
Light on purpose (no torch), so the leaderboard can import it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def vector_sha256(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a vector file, or of a basis directory (every .safetensors and .json below it,
    by relative path); None if there is nothing at `path`."""
    if not path:
        return None
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        digest.update(f"{file.relative_to(path).as_posix()}\0{hashlib.sha256(file.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()
