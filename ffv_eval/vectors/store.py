"""Vectors on disk: `<name>.safetensors` (one tensor, "vector") beside `<name>.json` (metadata:
model fingerprint, layer, relation, heads, data hash, seed, metrics). Both are written to
temporary files and renamed into place, so a failed or interrupted save leaves nothing.
Vectors are named <root>/<model alias>/<kind>/<relation>.safetensors; names are looked up in
./vectors first, then among the shipped vectors (ffv_eval.vectors.locations)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ffv_eval import VECTORS_DIR  # noqa: F401  (the shipped library; alignment and basis import it from here)
from ffv_eval.errors import FFVError
from ffv_eval.files.atomic import atomic_write, atomic_write_text
from ffv_eval.files.json_lines import json_document
from ffv_eval.vectors.locations import vector_roots

FORMAT = "ffv-eval/vector/1"
KINDS = ("fv", "ffv", "ffv-random")
BARE_NAME_KINDS = ("ffv", "fv")  # what a bare shipped name means, in order of preference
REQUIRED_FIELDS = {"format": str, "kind": str, "relation": str, "model_fingerprint": str, "hidden_size": int, "layer": int}


class VectorFileError(FFVError, ValueError):
    """A vector file (and its JSON sidecar) that is missing, malformed, non-finite, already there,
    or made for another model."""


class VectorNameError(FFVError, ValueError):
    """A vector name or spec (`antonym`, `fv:antonym`, `ffv:*`) with an unknown kind, or naming no
    vector (of the model)."""


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


def shipped_path(model_alias: str, kind: str, relation: str, root: Path | None = None) -> Path:
    """The file of a vector name to read: under `root` when given, else the first of
    `vector_roots()` that has it (the shipped path when none has it)."""
    paths = [r / model_alias / kind / f"{relation}.safetensors" for r in ([root] if root is not None else vector_roots())]
    return next((p for p in paths if p.exists()), paths[-1])


def find_vectors(spec: str, root: Path | None = None) -> list[StoredVector]:
    """A vector file path, or a shipped name (`antonym`: the FFV where there is one, else the
    FV; `fv:antonym`, `ffv:antonym`): every vector of that name, for any model, from `root` or
    else `vector_roots()` (per model, a vector in ./vectors wins over the shipped ones). The
    caller picks the one whose model fingerprint matches (see `check_compatible`)."""
    spec = str(spec)
    if spec.endswith(".safetensors") or os.sep in spec or Path(spec).exists():
        return [load_vector(spec)]
    kind, _, relation = spec.rpartition(":")
    if kind and kind not in KINDS:
        raise VectorNameError(f"vector '{spec}': unknown kind '{kind}' (known: {', '.join(KINDS)})")
    roots = [root] if root is not None else vector_roots()
    found: dict[str, StoredVector] = {}  # per model directory: the first root, then the first kind in preference order
    for r in roots:
        for k in [kind] if kind else BARE_NAME_KINDS:
            for path in sorted(r.glob(f"*/{k}/{relation}.safetensors")):
                if path.parent.parent.name not in found:
                    found[path.parent.parent.name] = load_vector(path)
    if not found:
        known = sorted({f"{p.parent.name}:{p.stem}" for r in roots for p in r.glob("*/*/*.safetensors")})
        raise VectorNameError(f"unknown vector name '{spec}' and no such file (looked in {', '.join(map(str, roots))}; "
                             f"known: {', '.join(known) or 'none'})")
    return list(found.values())


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


