"""The vector jobs behind the CLI: `ffv extract` (an FV by causal mediation, with its heat
map), `ffv train` (an FFV fine-tuned from the FV or from random) and `ffv decode` (the tokens a
vector promotes). Each validates its input before any model work starts and saves atomically."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ffv_eval import __version__
from ffv_eval.data.relations import RelationDataError, WordPair, load_relation, project_relations, read_pairs
from ffv_eval.data.test_sets import test_screen
from ffv_eval.errors import SettingError
from ffv_eval.files.atomic import check_writable
from ffv_eval.files.hashes import file_sha256, pairs_sha256
from ffv_eval.models.loading import Placement, load_model_and_tokenizer, model_fingerprint, text_config
from ffv_eval.models.patching import Patcher
from ffv_eval.progress import show_progress
from ffv_eval.vectors.decoding import decode_vector, format_side_by_side
from ffv_eval.vectors.fine_tuning import TrainingSettings, check_training_pairs, train_function_vector
from ffv_eval.vectors.function_vectors import ExtractionSettings, extract_function_vector
from ffv_eval.vectors.heatmap import save_indirect_effect_heatmap
from ffv_eval.vectors.library import KINDS, TRAINING_PAIRS, output_path, shipped_path, sidecar_training_pairs
from ffv_eval.vectors.scoring import first_token_accuracy
from ffv_eval.vectors.spec import VectorNameError, VectorSpec
from ffv_eval.vectors.store import VectorFileError, check_compatible, load_vector, save_vector, sidecar_path


def _refuse_existing(path: Path, force: bool) -> None:
    if path.suffix != ".safetensors":
        raise VectorFileError(f"{path}: vector files end in .safetensors")
    check_writable(path, "--out")  # never into the installed package, nor a read-only folder
    if not force and (path.exists() or sidecar_path(path).exists()):
        raise VectorFileError(f"{path} exists; pass --force to overwrite")


def data_reference(relation) -> dict:
    return {"source": relation.source, "file": relation.path.name, "sha256": relation.sha256,
            "n_train": len(relation.train), "n_validation": len(relation.validation), "n_test": len(relation.test)}


def pair_list(pairs) -> list[list[str]]:
    """Word pairs as a sidecar's TRAINING_PAIRS field: [[input, output], ...], each once, in order."""
    return [list(p) for p in dict.fromkeys((p.input, p.output) for p in pairs)]


def screened(relation, screen, progress):
    """The relation with its train and validation splits screened against `screen` (every test
    set found: data.test_sets.test_screen); the removals are reported per test set."""
    kept = dataclasses.replace(relation, train=tuple(screen.keep(relation.train)), validation=tuple(screen.keep(relation.validation)))
    for line in screen.report(f"{relation.name} train and validation pairs"):
        progress(line)
    return kept


def extract_and_save(
    model_name: str,
    relation_name: str,
    out: str | None = None,
    data_dir: str | None = None,
    settings: ExtractionSettings = ExtractionSettings(),
    force: bool = False,
    progress=show_progress,
    placement: Placement = Placement(),
) -> Path:
    placement = placement.checked()  # device and dtype errors before any model work
    relation = screened(load_relation(relation_name, data_dir), test_screen(data_dir), progress)  # data errors before any model work
    path = Path(out) if out else output_path(model_name, "fv", relation_name)
    _refuse_existing(path, force)

    if settings.layer is not None:
        n_layers = text_config(model_name).num_hidden_layers
        if not 0 <= settings.layer < n_layers:
            raise SettingError(f"layer {settings.layer} out of range: the model has layers 0..{n_layers - 1}")

    t = time.perf_counter()
    progress(f"[ffv] loading {model_name}")
    model, tokenizer = load_model_and_tokenizer(model_name, placement=placement)
    patcher = Patcher(model)
    with torch.no_grad():
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
        "heads": [{"layer": layer, "head": h, "indirect_effect": round(e, 6)} for layer, h, e in result.heads],
        "data": data_reference(relation),
        # prompts drew on the train split, the layer and heads were chosen on the validation split
        TRAINING_PAIRS: pair_list([*relation.train, *relation.validation]),
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


def train_and_save(
    model_name: str,
    relation_name: str,
    out: str | None = None,
    start_from: str | None = None,
    data_dir: str | None = None,
    settings: TrainingSettings = TrainingSettings(),
    pairs_file: str | None = None,
    force: bool = False,
    progress=show_progress,
    placement: Placement = Placement(),
) -> Path:
    """Train an FFV from the relation's FV (`start_from`, default the shipped FV of the model),
    from a random vector of the FV's norm (settings.init == "random"), or from the in-context
    difference of its training pairs at the FV's layer (settings.init == "icl-diff")."""
    placement = placement.checked()  # device, dtype and setting errors before any model work
    settings = settings.checked()
    screen = test_screen(data_dir)
    relation = screened(load_relation(relation_name, data_dir), screen, progress)
    pairs = list(relation.train)
    if pairs_file:  # pairs the user chose: one found in a test set is an error, not dropped
        pairs = read_pairs(Path(pairs_file), keep_repeated_inputs=True)
        found = [(p, screen.sources_of((p.input, p.output))) for p in pairs]
        found = [(p, sources) for p, sources in found if sources]
        if found:
            raise RelationDataError(f"{pairs_file}: training pairs overlap the test split: "
                                    + ", ".join(f"{p.input}:{p.output} (in {', '.join(sources)})" for p, sources in found[:5])
                                    + (f" and {len(found) - 5} more" if len(found) > 5 else "") + "; remove them from the file")
    pairs = check_training_pairs(pairs, relation.test, settings.n_pairs, pairs_file or f"train split of {relation.path}")
    kind = trained_kind(settings.init)
    path = Path(out) if out else output_path(model_name, kind, relation_name)
    _refuse_existing(path, force)
    fv_path = Path(start_from) if start_from else shipped_path(model_name, "fv", relation_name)
    if not fv_path.exists():
        raise VectorFileError(f"{fv_path}: no function vector to start from; run: ffv extract --model {model_name} --relation {relation_name}")
    start = load_vector(fv_path)
    start_pairs = sidecar_training_pairs(start.metadata, sidecar_path(fv_path)) if settings.init != "random" else []
    if start_pairs is None:
        progress(f"[ffv] warning: {fv_path} records no training pairs (made before ffv-eval recorded them): the {kind} "
                 f"records only its own, so its overlap with test data is checked without its starting vector's pairs")
    config = text_config(model_name)
    check_compatible(start, config.hidden_size, config.num_hidden_layers, None, None)

    progress(f"[ffv] loading {model_name}")
    model, tokenizer = load_model_and_tokenizer(model_name, placement=placement)
    patcher = Patcher(model)
    fingerprint = model_fingerprint(model)
    layer = check_compatible(start, patcher.adapter.hidden_size, patcher.adapter.n_layers, fingerprint, None)
    progress(f"[ffv] training {kind} for {relation_name} on {len(pairs)} pairs at layer {layer} ({settings.steps} steps)")
    result = train_function_vector(patcher, tokenizer, pairs, layer, start.vector, settings, lambda m: progress(f"[ffv] {m}"))
    with torch.no_grad():
        accuracy = first_token_accuracy(patcher, tokenizer, relation.validation, layer, result.vector)
        start_accuracy = first_token_accuracy(patcher, tokenizer, relation.validation, layer, result.initial_vector)
    metadata = {
        "kind": kind,
        "relation": relation_name,
        "model": model_name,
        "model_fingerprint": fingerprint,
        "model_type": model.config.model_type,
        "layer": layer,
        "scale": settings.scale,  # already applied to the vector
        "heads": start.metadata.get("heads", []),
        "init": settings.init,
        "initial_vector": {"file": fv_path.name, "sha256": file_sha256(fv_path)},
        "data": {**data_reference(relation), "training_pairs": pairs_file or "train split",
                 "training_pairs_sha256": pairs_sha256(pairs)},
        # its own training pairs, then those of the FV it started from
        TRAINING_PAIRS: pair_list([*pairs, *(WordPair(a, b) for a, b in start_pairs or [])]),
        "seed": settings.seed,
        "settings": dataclasses.asdict(settings),
        "metrics": {
            "validation_first_token_accuracy": accuracy,
            "validation_first_token_accuracy_at_init": start_accuracy,
            "first_loss": result.losses[0],
            "last_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
        },
        "ffv_eval_version": __version__,
    }
    save_vector(path, result.vector, metadata, force=force)
    progress(f"[ffv] saved {path} in {result.seconds:.0f}s: validation first-token accuracy {start_accuracy:.2f} -> {accuracy:.2f}")
    return path


def decode_and_print(specs: list[str], model_name: str, k: int = 20, data_dir: str | None = None, print_=show_progress,
                     placement: Placement = Placement()) -> dict:
    """Decode vectors given as files or shipped names; a bare shipped name (`antonym`) shows the
    model's FV and FFV side by side."""
    placement = placement.checked()
    stored = []
    for text in specs:
        spec = VectorSpec.parse(text)
        if spec.is_file:
            stored.append(load_vector(spec.path))
        elif spec.is_name and spec.kind:
            stored.append(load_vector(shipped_path(model_name, spec.kind, spec.relation)))
        else:  # a bare name: every kind shipped for the model, side by side
            paths = [shipped_path(model_name, k, spec.relation if spec.is_name else text) for k in KINDS]
            if not any(p.exists() for p in paths):
                raise VectorNameError(f"no shipped vector '{text}' for {model_name} (looked for {', '.join(map(str, paths))})")
            stored.extend(load_vector(p) for p in paths if p.exists())
    relations = {s.metadata["relation"]: load_relation(s.metadata["relation"], data_dir) for s in stored}
    model, tokenizer = load_model_and_tokenizer(model_name, placement=placement)
    patcher = Patcher(model)
    fingerprint = model_fingerprint(model)
    decodings = {}
    for s in stored:
        check_compatible(s, patcher.adapter.hidden_size, patcher.adapter.n_layers, fingerprint, None)
        rel = relations[s.metadata["relation"]]
        pairs = rel.train + rel.validation + rel.test
        decodings[f"{s.metadata['kind']}:{s.metadata['relation']}"] = decode_vector(patcher.adapter, tokenizer, s.vector, pairs, k)
    print_(format_side_by_side(decodings))
    return decodings


def trained_kind(init: str) -> str:
    """The library kind of an FFV trained from the start `init` (TrainingSettings.init)."""
    return "ffv-random" if init == "random" else "ffv"


def build_library(model_name: str, relations: list[str] | None = None, force: bool = False,
                  extraction: ExtractionSettings = ExtractionSettings(), training: TrainingSettings = TrainingSettings(),
                  progress=show_progress, placement: Placement = Placement()) -> list[Path]:
    """The vector library of one model, under ./vectors (the shipped library when run in the
    checkout): per relation an FV, an FFV trained from the start `training.init` (the FV unless
    it says "icl-diff") and an FFV from random init.
    Existing vectors there are kept unless `force`; with `force` everything is
    rebuilt from scratch, and the same settings on the same machine give bit-identical files."""
    placement = placement.checked()
    relations = relations or project_relations()
    for name in relations:  # every data error before any model work
        load_relation(name)
    made = []
    for i, name in enumerate(relations, start=1):
        progress(f"[ffv] library {model_name}: relation {i}/{len(relations)}: {name}")
        fv_path = output_path(model_name, "fv", name)
        if force or not fv_path.exists():
            made.append(extract_and_save(model_name, name, settings=extraction, force=force, progress=progress,
                                             placement=placement))
        for init in (training.init if training.init != "random" else "fv", "random"):
            kind = trained_kind(init)
            if force or not output_path(model_name, kind, name).exists():
                made.append(train_and_save(model_name, name, settings=dataclasses.replace(training, init=init),
                                           force=force, progress=progress, placement=placement))
    return made
