"""Jobs behind `ffv basis build` and `ffv compose`: load the model, gather the basis relations,
train what is missing, fit the composite map, explain a pair."""

from __future__ import annotations

import time
from pathlib import Path

from ffv_eval import DEFAULT_MODEL
from ffv_eval.data.basis_sources import basis_relations
from ffv_eval.data.relations import data_dir_from_env
from ffv_eval.data.test_sets import test_screen
from ffv_eval.errors import SettingError
from ffv_eval.files.atomic import check_writable
from ffv_eval.files.lock import cache_lock
from ffv_eval.models.loading import Placement, load_model_and_tokenizer, model_fingerprint
from ffv_eval.models.patching import Patcher
from ffv_eval.progress import show_progress
from ffv_eval.vectors.basis import BasisSettings, build_basis
from ffv_eval.vectors.composite import CompositeVectors, model_composite_map, save_composite_map
from ffv_eval.vectors.composite_fit import MapSettings, fit_composite_map, training_analogies
from ffv_eval.vectors.composite_questions import validation_questions
from ffv_eval.vectors.library import TRAINING_PAIRS_FILE, basis_output_dir, composite_files, write_basis_training_pairs


def build_basis_and_map(model_name: str = DEFAULT_MODEL, data_dir=None, sources=None, out=None, force: bool = False,
                        basis_settings: BasisSettings = BasisSettings(), map_settings: MapSettings = MapSettings(),
                        max_relations: int | None = None, progress=show_progress, placement: Placement = Placement(),
                        screen: bool = True) -> Path:
    """Train the missing basis FFVs (project relations, plus every relation found in the data
    directory), then fit and save the composite map. Returns the basis directory. Every pair of
    an analogy or relation test set found (data.test_sets) is screened out first; with no
    analogy test set to screen against the build is refused unless `screen` is False."""
    placement = placement.checked()
    data_dir = data_dir_from_env(data_dir)
    if sources is None:
        sources = ("project", "todd", "bats", "google", "semeval") if data_dir else ("project",)
    exclude = test_screen(data_dir) if screen else frozenset()
    if screen and not exclude.has_analogy_sets:
        raise SettingError(f"ffv basis build: no analogy test set to screen the basis against "
                           f"({'none in ' + str(data_dir) if data_dir else 'no data directory'}); pass --data-dir (or set "
                           f"FFV_DATA_DIR) to a directory with analogy_questions/*/test.jsonl, ucla_vat/ or analogy_completion/, "
                           f"or --no-screen to build a basis that may contain test pairs")
    relations = basis_relations(data_dir, sources=tuple(sources), exclude=exclude)
    for line in exclude.report("basis relations") if screen else ["[ffv] basis relations: not screened (--no-screen)"]:
        progress(line)
    if max_relations:
        relations = relations[:max_relations]
    directory = Path(out) if out else basis_output_dir(model_name)
    check_writable(composite_files(directory)[0], "--out")
    progress(f"[ffv] loading {model_name} ({placement.device or placement.device_map}, {placement.dtype})")
    model, tokenizer = load_model_and_tokenizer(model_name, placement=placement)
    patcher = Patcher(model)
    fingerprint = model_fingerprint(model)
    # One build of a basis directory at a time: another process building it waits, then
    # trains only what is still missing.
    with cache_lock(directory / ".build.lock", f"building the basis {directory}", report=progress):
        t = time.perf_counter()
        basis = build_basis(patcher, tokenizer, model_name, fingerprint, relations, directory, basis_settings, force, progress)
        progress(f"[ffv] basis ready: {len(basis.names)} relations in {directory} ({time.perf_counter() - t:.0f}s)")
        analogies = training_analogies(relations, basis_settings.n_pairs, map_settings.stems_per_relation,
                                       map_settings.targets_per_stem, map_settings.seed)
        questions = validation_questions(data_dir, map_settings.question_sets, map_settings.questions_per_set) if data_dir else []
        progress(f"[ffv] validation questions: {len(questions)} from the valid splits of "
                 f"{', '.join(sorted({q.source for q in questions})) or 'no question set in the data directory'}")
        cmap = fit_composite_map(patcher, tokenizer, basis, analogies, map_settings, progress, questions)
        cmap.metadata["training_analogies"] = {"source": "two spare pairs (not trained on) of one basis relation",
                                               "screened_test_sets": exclude.names if screen else [], "count": len(analogies)}
        cmap.metadata["training_pairs"] = TRAINING_PAIRS_FILE
        write_basis_training_pairs(directory, training_pair_record(relations, basis_settings.n_pairs))
        path = save_composite_map(cmap, model_name)
    progress(f"[ffv] composite map saved: {path}")
    return directory


def training_pair_record(relations, n_training_pairs: int) -> dict:
    """{use: {relation: pairs}} of a basis: each relation's pairs (its starting vector's prompts
    drew on all of them, training on the first n_training_pairs), and the spare pairs the map's
    training analogies came from (composite_fit.training_analogies)."""
    return {"basis": {r.name: [(p.input, p.output) for p in r.pairs] for r in relations},
            "map": {r.name: [(p.input, p.output) for p in r.pairs[n_training_pairs:]]
                    for r in relations if len(r.pairs) - n_training_pairs >= 2}}


def explain_pairs(pairs: list[str], model_name: str = DEFAULT_MODEL, basis_dir=None, top: int = 10, print_=print,
                  placement: Placement = Placement()) -> list:
    """For each `a:b`, the top basis relations with posterior and weight."""
    placement = placement.checked()
    stems = []
    for text in pairs:
        a, sep, b = text.partition(":")
        if not sep or not a.strip() or not b.strip():
            raise SettingError(f"--pair {text!r}: expected a:b")
        stems.append((a.strip(), b.strip()))
    model, tokenizer = load_model_and_tokenizer(model_name, placement=placement)
    composite = CompositeVectors(Patcher(model), tokenizer, model_composite_map(model_name, model_fingerprint(model), basis_dir))
    out = []
    for a, b in stems:
        rows = composite.explain(a, b, top)
        out.append(rows)
        print_(f"{a}:{b}  (CFV norm {float(composite.vector(a, b).norm()):.1f}, layer {composite.layer})")
        width = max(len(name) for name, _, _ in rows)
        print_(f"  {'relation':<{width}} {'posterior':>9} {'weight':>8}")
        for name, posterior, weight in rows:
            print_(f"  {name:<{width}} {posterior:>9.3f} {weight:>8.3f}")
    return out
