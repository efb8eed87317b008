"""`ffv check`: a CI gate on vector quality. Each vector's quality figures are measured on the
model and compared with a baseline file of the same figures (`quality_baseline`):

- `accuracy`: zero-shot first-token accuracy on the relation's test split with the vector added
  at its layer; `zero_shot_accuracy` without a vector; `gain` = accuracy - zero_shot_accuracy;
- `decoding_hits`: how many of the top 20 tokens the vector promotes through the final norm and
  unembedding are the first token of one of the relation's answers;
- `vector`: the vector itself, so the comparison can say how far it moved.

Measuring needs the model (torch is imported inside `measure_quality` only); the command picks
the vectors and the baseline, measures, then compares or, with `--update-baseline`, writes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ffv_eval import PROJECT_ROOT
from ffv_eval.data.relations import MIN_TEST, SPLIT_SEED, load_project_relation
from ffv_eval.reports.quality_baseline import (
    BaselineError,
    Tolerances,
    baseline_to_update,
    check_same_model,
    compare_with_baseline,
    default_baseline_path,
    load_baseline,
    merged_baseline,
    write_baseline,
)
from ffv_eval.vectors.codec import encode_vector
from ffv_eval.vectors.library import model_dirs, model_vectors

DEFAULT_KINDS = ("fv", "ffv")
DECODING_TOP_K = 20
DIGITS = 6  # figures are rounded so that baselines are stable text


# -- measuring (needs the model) ----------------------------------------------------------
def shipped_vector_paths(model_alias: str, kinds: Sequence[str] = DEFAULT_KINDS, root: Path | None = None) -> list[Path]:
    """The model's vectors of `kinds` under `root`, else under ./vectors and the shipped library
    (a vector in ./vectors wins over the shipped one of the same kind and relation)."""
    paths = [path for kind in kinds for path in model_vectors(model_alias, kind, root)]
    if not paths:
        raise BaselineError(f"no shipped vectors of kinds {', '.join(kinds)} under "
                            f"{' or '.join(map(str, model_dirs(model_alias, root)))}")
    return paths


def vector_key(metadata: dict) -> str:
    return f"{metadata['kind']}/{metadata['relation']}"


def split_description(source: str) -> str:
    data = "project word pairs (tasks/relations/pairs)" if source == "project" else \
        "Todd et al. files (function_vectors/abstractive)"
    return (f"{data}: test split of each relation (30%, at least {MIN_TEST} pairs, split seed {SPLIT_SEED}); "
            f"zero-shot 'Q: x\\nA:' prompts, first-token accuracy; decoding hits in the top {DECODING_TOP_K} tokens")


def _display_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def load_gate_model(model_alias: str, placement=None):
    """(model, tokenizer, fingerprint); placement: an ffv_eval.models.loading.Placement (default:
    the default device, the checkpoint's dtype)."""
    from ffv_eval.models.loading import load_model_and_tokenizer, model_fingerprint

    model, tokenizer = load_model_and_tokenizer(model_alias, placement=placement)
    return model, tokenizer, model_fingerprint(model)


def measure_quality(model_alias: str, vector_paths: Sequence[str | Path], loaded=None,
                    progress: Callable[[str], None] = lambda message: None, placement=None) -> dict:
    """Quality figures of each vector file on the model, in the baseline layout. `loaded`:
    (model, tokenizer[, fingerprint]) already in memory, else the model is loaded here."""
    import torch

    from ffv_eval.models.loading import model_fingerprint
    from ffv_eval.models.patching import Patcher
    from ffv_eval.vectors.decoding import decode_vector
    from ffv_eval.vectors.scoring import first_token_accuracy
    from ffv_eval.vectors.store import check_compatible, load_vector

    stored = [load_vector(p) for p in vector_paths]  # file and data errors before any model work
    by_key = {}
    for s in stored:
        key = vector_key(s.metadata)
        if key in by_key:
            raise BaselineError(f"{s.path}: a second vector for '{key}' (the first is {by_key[key].path})")
        by_key[key] = s
    relations = {name: load_project_relation(name) for name in sorted({s.metadata["relation"] for s in stored})}
    sources = {r.source for r in relations.values()}
    model, tokenizer = (loaded[0], loaded[1]) if loaded else load_gate_model(model_alias, placement)[:2]
    fingerprint = loaded[2] if loaded and len(loaded) > 2 else model_fingerprint(model)
    patcher = Patcher(model)
    figures: dict[str, dict] = {}
    with torch.no_grad():
        zero_shot = {}
        for key, s in sorted(by_key.items()):
            layer = check_compatible(s, patcher.adapter.hidden_size, patcher.adapter.n_layers, fingerprint, None)
            relation = relations[s.metadata["relation"]]
            if relation.name not in zero_shot:
                zero_shot[relation.name] = first_token_accuracy(patcher, tokenizer, relation.test)
            accuracy = first_token_accuracy(patcher, tokenizer, relation.test, layer, s.vector)
            all_pairs = relation.train + relation.validation + relation.test
            hits = decode_vector(patcher.adapter, tokenizer, s.vector, all_pairs, DECODING_TOP_K).n_hits
            figures[key] = {
                "file": _display_path(s.path),
                "kind": s.metadata["kind"],
                "relation": relation.name,
                "layer": layer,
                "n_test": len(relation.test),
                "data_sha256": relation.sha256,
                "accuracy": round(accuracy, DIGITS),
                "zero_shot_accuracy": round(zero_shot[relation.name], DIGITS),
                "gain": round(accuracy - zero_shot[relation.name], DIGITS),
                "decoding_hits": hits,
                "norm": round(float(s.vector.norm()), DIGITS),
                "vector": encode_vector(s.vector.float().tolist()),
            }
            progress(f"[ffv] {key}: accuracy {accuracy:.3f} (zero-shot {zero_shot[relation.name]:.3f}), "
                     f"decoding hits {hits}/{DECODING_TOP_K}; {test_overlap(s, relation)}")
    return {"model": model_alias, "model_fingerprint": fingerprint,
            "test_split": split_description(sources.pop() if len(sources) == 1 else "project"),
            "vectors": figures}


def test_overlap(stored, relation) -> str:
    """The test pairs the gate scores that share a word pair with the vector's training data
    (data.overlap: normal forms, either order), shown beside its figures."""
    from ffv_eval.data.overlap import Overlap, PairScreen
    from ffv_eval.vectors.library import sidecar_training_pairs
    from ffv_eval.vectors.store import sidecar_path

    pairs = sidecar_training_pairs(stored.metadata, sidecar_path(stored.path))
    if pairs is None:
        return "test overlap not checked (no training pairs recorded)"
    overlap, screen = Overlap(), PairScreen(pairs)
    for p in relation.test:
        overlap.count(screen, [(p.input, p.output)])
    return f"test overlap {overlap.summary()}"


# -- the command --------------------------------------------------------------------------
def accept_command(model_alias: str, baseline_path: Path, vector_files: Sequence[str], kinds: Sequence[str]) -> str:
    parts = ["ffv check --update-baseline", f"--model {model_alias}", f"--baseline {baseline_path}"]
    parts += [str(f) for f in vector_files] if vector_files else ["--kinds " + " ".join(kinds)]
    return " ".join(parts)


def run_check(model_alias: str, vector_files: Sequence[str], baseline_path: str | Path | None = None,
              kinds: Sequence[str] = DEFAULT_KINDS, tolerances: Tolerances = Tolerances(), update: bool = False,
              print_: Callable[[str], None] = print, placement=None) -> int:
    """`ffv check`: 0 when every vector is within tolerance (or the baseline was written), 1 on
    a regression. Explicit files are compared with their own baseline entries only; the
    default set (the model's shipped vectors of `kinds`) must cover every baseline entry of
    those kinds."""
    if update:
        baseline_path = baseline_to_update(model_alias, baseline_path)
    else:
        baseline_path = Path(baseline_path) if baseline_path else default_baseline_path(model_alias)
    paths = [Path(f) for f in vector_files] or shipped_vector_paths(model_alias, kinds)
    baseline = load_baseline(baseline_path) if baseline_path.exists() or not update else None
    model, tokenizer, fingerprint = load_gate_model(model_alias, placement)
    if baseline is not None:
        check_same_model(baseline, fingerprint)  # before minutes of measuring
    measured = measure_quality(model_alias, paths, loaded=(model, tokenizer, fingerprint), progress=print_)
    if vector_files:
        required = set(measured["vectors"])
    else:
        required = {k for k in (baseline.vectors if baseline else {}) if k.split("/", 1)[0] in kinds}
    if update:
        if baseline is not None:
            check_same_model(baseline, fingerprint, measured["test_split"])
        document = merged_baseline(baseline, measured, required)
        write_baseline(baseline_path, document)
        print_(f"ffv check: wrote {baseline_path}: {len(document['vectors'])} vectors "
               f"({len(measured['vectors'])} measured now)")
        return 0
    report = compare_with_baseline(measured, baseline, tolerances, required)
    print_(report.text(accept_command(model_alias, baseline_path, vector_files, kinds)))
    return 0 if report.passed else 1
