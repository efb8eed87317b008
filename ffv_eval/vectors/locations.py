"""Where vectors and baselines are read and written. The shipped library (`ffv_eval.VECTORS_DIR`,
inside the installed package) is only read. Jobs write under ./vectors of the current working
directory by default, and names are looked up there first, then in the shipped library. Run in
the checkout, both are the same folder, so maintainers rebuild the shipped library in place.
Import-light (no torch): the quality gate's pure-Python side uses it too."""

from __future__ import annotations

import json
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


BASIS_SUBDIR = "basis"  # <root>/<model>/basis/: a model's basis FFVs and fitted composite map
COMPOSITE_MAP_FILE = "composite.safetensors"


def basis_output_dir(model_alias: str) -> Path:
    """Where `ffv basis build` writes by default: ./vectors/<model>/basis."""
    return local_vectors_dir() / model_alias / BASIS_SUBDIR


def find_basis_dir(model_alias: str, fingerprint: str | None = None) -> Path | None:
    """The basis directory (with a fitted map) of a model: <root>/<model alias>/basis in the
    order of vector_roots(); else, given the loaded model's fingerprint, any <root>/*/basis whose
    map was fitted on that model (a hub id or a local path of an embedded model). None if none."""
    for root in vector_roots():
        directory = root / model_alias / BASIS_SUBDIR
        if (directory / COMPOSITE_MAP_FILE).is_file():
            return directory
    if fingerprint is not None:
        for root in vector_roots():
            for side in sorted(root.glob(f"*/{BASIS_SUBDIR}/composite.json")):
                try:
                    if json.loads(side.read_text(encoding="utf-8")).get("model_fingerprint") == fingerprint:
                        return side.parent
                except (OSError, ValueError):
                    continue  # an unreadable map is reported when it is loaded by name
    return None
