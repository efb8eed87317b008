"""`ffv extract`: a function vector for one relation on one model, saved with its metadata and
indirect-effect heat map. Validates everything before any model work starts."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ffv_eval import __version__
from ffv_eval.function_vectors import ExtractionSettings, extract_function_vector
from ffv_eval.model_loading import load_model_and_tokenizer, model_fingerprint, text_config
from ffv_eval.patching import Patcher
from ffv_eval.plots import save_indirect_effect_heatmap
from ffv_eval.relations import load_relation
from ffv_eval.vector_store import VectorFileError, save_vector, shipped_path, sidecar_path


def data_reference(relation) -> dict:
    return {"source": relation.source, "file": relation.path.name, "sha256": relation.sha256,
            "n_train": len(relation.train), "n_validation": len(relation.validation), "n_test": len(relation.test)}


def _flush_print(message: str) -> None:
    print(message, flush=True)


def extract_and_save(
    model_name: str,
    relation_name: str,
    out: str | None = None,
    data_dir: str | None = None,
    settings: ExtractionSettings = ExtractionSettings(),
    force: bool = False,
    progress=_flush_print,
) -> Path:
    relation = load_relation(relation_name, data_dir)  # data errors before any model work
    path = Path(out) if out else shipped_path(model_name, "fv", relation_name)
    if path.suffix != ".safetensors":
        raise VectorFileError(f"{path}: vector files end in .safetensors")
    if not force and (path.exists() or sidecar_path(path).exists()):
        raise VectorFileError(f"{path} exists; pass --force to overwrite")

    if settings.layer is not None:
        n_layers = text_config(model_name).num_hidden_layers
        if not 0 <= settings.layer < n_layers:
            raise VectorFileError(f"layer {settings.layer} out of range: the model has layers 0..{n_layers - 1}")

    t = time.perf_counter()
    progress(f"[ffv] loading {model_name}")
    model, tokenizer = load_model_and_tokenizer(model_name)
    patcher = Patcher(model)
    torch.set_grad_enabled(False)
    result = extract_function_vector(patcher, tokenizer, relation, settings, progress=lambda m: progress(f"[ffv] {m}"))
    seconds = time.perf_counter() - t

    metadata = {
        "kind": "fv",
        "relation": relation_name,
        "model": model_name,
        "model_fingerprint": model_fingerprint(model),
        "model_type": model.config.model_type,
        "layer": result.layer,
        "scale": result.scale,
        "heads": [{"layer": l, "head": h, "indirect_effect": round(e, 6)} for l, h, e in result.heads],
        "data": data_reference(relation),
        "seed": settings.seed,
        "settings": dataclasses.asdict(settings),
        "metrics": {
            "validation_first_token_accuracy": result.validation_accuracy,
            "validation_zero_shot_first_token_accuracy": result.zero_shot_validation_accuracy,
            "validation_accuracy_by_layer": {str(k): v for k, v in result.validation_accuracy_by_layer.items()},
        },
        "ffv_eval_version": __version__,
    }
    save_vector(path, result.vector, metadata, force=force)
    heatmap = save_indirect_effect_heatmap(
        result.indirect_effects, path.with_suffix(".png"),
        f"{model_name} / {relation_name}: average indirect effect", result.heads,
    )
    progress(f"[ffv] saved {path} (+ {sidecar_path(path).name}, {heatmap.name}) in {seconds:.0f}s; layer {result.layer}, "
             f"{len(result.heads)} heads, x{result.scale:g}")
    return path
