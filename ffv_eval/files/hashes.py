"""Content hashes (SHA-256, hex), the one home of each: of a file (a relation's data file, the
vector an FFV started from), of word pairs (the pairs a vector was trained on, in its sidecar),
and of a vector file or basis directory (what a results file records as the vector it was patched
with, and what `ffv leaderboard --run` compares before reusing a run). Light on purpose (no
torch), so the leaderboard can import it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pairs_sha256(pairs: Iterable) -> str:
    """SHA-256 of word pairs (objects with .input and .output), in order, as the JSON text
    [["input", "output"], ...] (json.dumps defaults): the `pairs_sha256` and
    `training_pairs_sha256` of vector sidecars."""
    return hashlib.sha256(json.dumps([[p.input, p.output] for p in pairs]).encode()).hexdigest()


def vector_sha256(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a vector file, or of a basis directory (every .safetensors and .json below it,
    by relative path); None if there is nothing at `path`."""
    if not path:
        return None
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()
