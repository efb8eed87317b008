"""Vectors on disk: `<name>.safetensors` (one tensor, "vector") beside `<name>.json` (metadata:
model fingerprint, layer, relation, heads, data hash, seed, metrics). Both are written to
temporary files and renamed into place, so a failed or interrupted save leaves nothing.
Names (`antonym`, `fv:antonym`: vectors.spec) are looked up in the vector library
(vectors.library: ./vectors first, then the shipped vectors)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ffv_eval.errors import FFVError
from ffv_eval.files.atomic import atomic_write, atomic_write_text
from ffv_eval.files.json_lines import json_document
from ffv_eval.vectors.library import known_names, lookup_roots, named_vector_paths
from ffv_eval.vectors.spec import VectorNameError, VectorSpec

FORMAT = "ffv-eval/vector/1"
REQUIRED_FIELDS = {"format": str, "kind": str, "relation": str, "model_fingerprint": str, "hidden_size": int, "layer": int}


class VectorFileError(FFVError, ValueError):
    """A vector file (and its JSON sidecar) that is missing, malformed, non-finite, already there,
    or made for another model."""


@dataclass
class StoredVector:
    vector: torch.Tensor
    metadata: dict
    path: Path


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save_vector(path: str | os.PathLike, vector: torch.Tensor, metadata: dict, force: bool = False) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise VectorFileError(f"{path}: vector files end in .safetensors")
    meta = {"format": FORMAT, **metadata, "hidden_size": int(vector.numel())}
    _check_metadata(meta, path)
    check_finite(vector, path)
    if not force and (path.exists() or sidecar_path(path).exists()):
        raise VectorFileError(f"{path} exists; pass --force to overwrite")
    tensor = vector.detach().float().cpu().contiguous().view(-1)
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    # The sidecar goes last: a vector without a sidecar is never loaded.
    atomic_write(path, lambda tmp: save_file({"vector": tensor}, tmp))
    atomic_write_text(sidecar_path(path), text)
    return path


def check_finite(vector: torch.Tensor, where) -> None:
    if not torch.isfinite(vector).all():
        bad = int((~torch.isfinite(vector)).sum())
        raise VectorFileError(f"{where}: vector has {bad} non-finite values (NaN or inf)")


def _check_metadata(meta: dict, where) -> None:
    for name, kind in REQUIRED_FIELDS.items():
        if name not in meta:
            raise VectorFileError(f"{where}: metadata field '{name}' is missing")
        if not isinstance(meta[name], kind) or isinstance(meta[name], bool):
            raise VectorFileError(f"{where}: metadata field '{name}' should be {kind.__name__}, got {meta[name]!r}")
    if meta["format"] != FORMAT:
        raise VectorFileError(f"{where}: field 'format' is {meta['format']!r}, expected {FORMAT!r}")


def load_vector(path: str | os.PathLike) -> StoredVector:
    path = Path(path)
    side = sidecar_path(path)
    if not path.exists():
        raise VectorFileError(f"vector file {path} does not exist")
    if not side.exists():
        raise VectorFileError(f"{path}: metadata sidecar {side} is missing")
    meta = json_document(side, VectorFileError)
    if not isinstance(meta, dict):
        raise VectorFileError(f"{side}: expected a JSON object")
    _check_metadata(meta, side)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise VectorFileError(f"{path}: not a readable safetensors file ({err})") from err
    if set(tensors) != {"vector"}:
        raise VectorFileError(f"{path}: expected one tensor named 'vector', found {sorted(tensors)}")
    vector = tensors["vector"].float()
    if vector.dim() != 1 or vector.numel() != meta["hidden_size"]:
        raise VectorFileError(
            f"{path}: tensor shape {tuple(vector.shape)} does not match field 'hidden_size' = {meta['hidden_size']} in {side}"
        )
    check_finite(vector, path)
    return StoredVector(vector, meta, path)


def find_vectors(spec: VectorSpec | str, root: Path | None = None) -> list[StoredVector]:
    """The vectors of a spec that names vectors (a VectorSpec, or a vector= string parsed by
    one): a file, or a name (`antonym`: the FFV where there is one, else the FV; `fv:antonym`,
    `ffv:antonym`) with every vector of that name, for any model, from `root` or else the
    library's roots (per model, a vector in ./vectors wins over the shipped ones). The caller
    picks the one whose model fingerprint matches (see `check_compatible`)."""
    spec = VectorSpec.parse(spec)
    if spec.is_file:
        return [load_vector(spec.path)]
    if not spec.is_name:
        raise VectorNameError(f"vector={spec} names no vector file: it is not a vector name (antonym, fv:antonym) "
                              f"or a .safetensors file")
    paths = named_vector_paths(spec.relation, spec.kinds, root)
    if not paths:
        raise VectorNameError(f"unknown vector name '{spec}' and no such file (looked in {', '.join(map(str, lookup_roots(root)))}; "
                              f"known: {', '.join(known_names(root)) or 'none'})")
    return [load_vector(path) for path in paths]


def check_compatible(stored: StoredVector, hidden_size: int, n_layers: int, fingerprint: str | None, layer: int | None) -> int:
    """Raise a clear error if the vector cannot be used on this model; return the layer to use."""
    meta = stored.metadata
    if meta["hidden_size"] != hidden_size:
        raise VectorFileError(f"{stored.path}: vector has hidden size {meta['hidden_size']}, the model has {hidden_size}")
    if fingerprint is not None and meta["model_fingerprint"] != fingerprint:
        raise VectorFileError(
            f"{stored.path}: made for model fingerprint {meta['model_fingerprint']} "
            f"({meta.get('model', 'unknown model')}), the loaded model is {fingerprint}"
        )
    use = meta["layer"] if layer is None else layer
    if not 0 <= use < n_layers:
        raise VectorFileError(f"layer {use} out of range: the model has layers 0..{n_layers - 1}")
    return use


