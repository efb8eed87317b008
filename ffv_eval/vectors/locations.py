"""Where vectors and baselines are read and written. The shipped library (`ffv_eval.VECTORS_DIR`,
inside the installed package) is only read. Jobs write under ./vectors of the current working
directory by default, and names are looked up there first, then in the shipped library. Run in
the checkout, both are the same folder, so maintainers rebuild the shipped library in place.
Import-light (no torch): the quality gate's pure-Python side uses it too."""

from __future__ import annotations

from pathlib import Path

from ffv_eval import VECTORS_DIR


def local_vectors_dir() -> Path:
    """./vectors of the current working directory."""
    return Path.cwd() / "vectors"


def vector_roots() -> list[Path]:
    """Where names are looked up, in order: ./vectors, then the shipped library (one root in the
    checkout, where they are the same folder)."""
    local = local_vectors_dir()
    if local.resolve() == VECTORS_DIR.resolve():
        return [VECTORS_DIR]
    return [local, VECTORS_DIR]


def output_path(model_alias: str, kind: str, relation: str) -> Path:
    """A job's default output file: ./vectors/<model>/<kind>/<relation>.safetensors."""
    return local_vectors_dir() / model_alias / kind / f"{relation}.safetensors"
