"""FFV training variants, scored on the relations' validation splits only (issue 20).

Each variant trains the FFVs of the project's relations from their shipped FVs, at their FVs'
layers, with TrainingSettings changed as the variant says, and scores each vector as the
`relation_<name>` tasks do (greedy generation after the zero-shot `Q: x\\nA:` prompt, the vector
at the prompt's last token, the first generated word(s) against the answer), on the validation
pairs, which no training sees. The shipped FFVs and 10-shot prompting (demonstrations drawn from
the train split) are scored the same way as references. Test splits are never read.

    python research/ffv_training_variants.py --model gemma-3-270m --variants shipped 10-shot pairs-all

Each variant's figures are merged into the model's variants file (research/results/
ffv-variants-<model>.json, or --out; run variants in separate processes and they land in one
file). That file's format is read by ffv_eval.reports.results_page, which owns its name and its
reference rows. docs/results.md shows them, each variant paired against the shipped FFVs
(`python -m ffv_eval.reports.results_page`, block ffv_variants).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

from ffv_eval.data.prompts import fewshot_prompt, query_text
from ffv_eval.data.relations import data_dir_from_env, load_project_relation, project_relations
from ffv_eval.data.task_data import first_word_match
from ffv_eval.data.test_sets import test_screen
from ffv_eval.files.atomic import atomic_write_text
from ffv_eval.files.lock import cache_lock
from ffv_eval.models.loading import input_device, load_model_and_tokenizer
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tokens import encode_answers, left_pad, pad_id_of
from ffv_eval.reports.results_page import PROMPTING_VARIANT, REFERENCE_VARIANTS, VARIANT_BASELINE, variant_file
from ffv_eval.vectors.fine_tuning import TrainingSettings, starting_vectors, train_function_vectors
from ffv_eval.vectors.jobs import screened
from ffv_eval.vectors.library import shipped_path
from ffv_eval.vectors.store import load_vector

ALL_PAIRS = 10_000  # n_pairs above any split: every screened training pair

# name -> TrainingSettings fields changed from the defaults (n_pairs ALL_PAIRS: all of the train split).
# Every variant before the scale ones was run when the trained vector was saved as trained:
# "scale": 1.0 says so, and reruns them so.
VARIANTS: dict[str, dict] = {
    "default": {},
    "loss-answer": {"loss": "answer", "scale": 1.0},  # the default before these variants (the paper's loss)
    "loss-answer-newline": {"loss": "answer-newline", "scale": 1.0},
    # variants of the "answer" loss, tried before "answer-newline" became the default
    "pairs-all": {"loss": "answer", "n_pairs": ALL_PAIRS, "scale": 1.0},
    "pairs-all-steps-120": {"loss": "answer", "n_pairs": ALL_PAIRS, "steps": 120, "scale": 1.0},
    "pairs-all-batch-8": {"loss": "answer", "n_pairs": ALL_PAIRS, "batch_size": 8, "scale": 1.0},
    "steps-30": {"loss": "answer", "steps": 30, "scale": 1.0},
    "steps-120": {"loss": "answer", "steps": 120, "scale": 1.0},
    "l2-0.1": {"loss": "answer", "l2": 0.1, "scale": 1.0},
    "l2-0": {"loss": "answer", "l2": 0.0, "scale": 1.0},
    "lr-0.02": {"loss": "answer", "learning_rate": 0.02, "scale": 1.0},
    "pairs-all-l2-0.1": {"loss": "answer", "n_pairs": ALL_PAIRS, "l2": 0.1, "scale": 1.0},
    # "layer": every relation's FFV trained (from its FV) and added at this layer, not its FV's
    "layer-4": {"loss": "answer", "layer": 4, "scale": 1.0},
    "layer-6": {"loss": "answer", "layer": 6, "scale": 1.0},
    "layer-8": {"loss": "answer", "layer": 8, "scale": 1.0},
    # the two best "answer" variants above, combined with the "answer-newline" loss
    "newline-lr-0.02": {"loss": "answer-newline", "learning_rate": 0.02, "scale": 1.0},
    "newline-layer-6": {"loss": "answer-newline", "layer": 6, "scale": 1.0},
    # the scale the trained vector is saved multiplied by (the shipped loss): training is
    # deterministic and the scale applied after it, so these rescale the shipped FFVs (stored
    # vector x scale / its own scale) instead of training them again
    **{f"scale-{s:g}": {"scale": s} for s in (0.5, 0.6, 0.75, 0.8, 0.85, 0.9, 1.0, 1.25, 1.5, 2.0)},
    # the shipped settings plus an unlikelihood term against answering with the input's own
    # first token (the FFV's commonest miss on english-french: "egg" -> "egg")
    **{f"copy-penalty-{w:g}": {"copy_penalty": w} for w in (0.3, 1.0)},
    # another start (TrainingSettings.init "icl-diff"): the mean difference, after the FV's block
    # at the prompt's last token, between each training input's 10-shot prompt and its zero-shot
    # prompt (an in-context "task vector"), scored as it is (icl-diff) and trained from with the
    # shipped settings. Both were run with the demonstrations drawn with seed 1234, before the
    # start became a training setting (which draws them with TrainingSettings.seed, 0).
    "icl-diff": {"init": "icl-diff", "trained": False},
    "init-icl-diff": {"init": "icl-diff"},
    # the FV start with every other default: the FFVs shipped before a model's library was
    # rebuilt from the icl-diff start (gemma-3-270m's "shipped" record before that)
    "init-fv": {"init": "fv"},
    # the scale again, for the icl-diff start (gemma-3-270m's shipped FFVs): run as the scale-
    # rows were, rescaling the shipped FFVs (training is deterministic, the scale applied after it)
    **{f"icl-diff-scale-{s:g}": {"init": "icl-diff", "scale": s} for s in (0.75, 1.0)},
    # the copy penalty again, for the icl-diff start (copies of the input are still most of
    # its English-French misses)
    "icl-diff-copy-penalty-1": {"init": "icl-diff", "copy_penalty": 1.0},
    # the step size, the steps and the pairs again, for the icl-diff start: the learning rate and
    # the l2 weight are relative to the start, and the icl-diff start is far longer than an FV, so
    # the shipped settings move it further; these stay nearer the start (which alone does well on
    # English-French) or fit more pairs
    "icl-diff-lr-0.02": {"init": "icl-diff", "learning_rate": 0.02},
    "icl-diff-steps-30": {"init": "icl-diff", "steps": 30},
    "icl-diff-pairs-all": {"init": "icl-diff", "n_pairs": ALL_PAIRS},
    # the shipped settings with another training seed (the icl-diff start's demonstrations and the
    # batches): not candidates, but the spread a variant's difference from the shipped FFVs must beat
    **{f"icl-diff-seed-{s}": {"init": "icl-diff", "seed": s} for s in (1, 2, 3)},
}
SCRIPT_ONLY = ("layer", "trained")  # variant fields this script handles, not TrainingSettings'
# A relation-level calibration, from the scale- records above (no model run): each relation's
# validation questions are split by parity, and each half is scored with the scale that did best
# on the other half (ties to the scale nearest the default)
PER_RELATION_SCALE = "scale-per-relation"
MAX_NEW_TOKENS = 8  # as the relation tasks generate (tasks/relations/_relation_template_yaml)
N_SHOT = 10


@torch.no_grad()
def generations(patcher, tokenizer, prompts, layer=None, vector=None):
    rows = encode_answers(tokenizer, prompts, ["x"] * len(prompts)).context_ids
    ids, mask = left_pad(rows, pad_id_of(tokenizer), input_device(patcher.model))
    out = patcher.generate(ids, layer=layer, vector=vector, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS,
                           do_sample=False, pad_token_id=pad_id_of(tokenizer))
    return [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).split("\n")[0] for row in out]


def score(texts, pairs):
    return [first_word_match(t, p.output) for t, p in zip(texts, pairs)]


def per_relation_scale(variants: dict) -> dict:
    """The PER_RELATION_SCALE record, from the scale- records in `variants` (a variants file's)."""
    scales = {name: VARIANTS[name]["scale"] for name in variants if name.startswith("scale-") and name in VARIANTS}
    if not scales:
        sys.exit(f"{PER_RELATION_SCALE} needs the scale- variants scored first")
    default = TrainingSettings().scale
    per_relation = {}
    for r, reference in variants[next(iter(scales))]["relations"].items():
        n = len(reference["correct"])
        correct = [0.0] * n
        for half in (0, 1):
            chosen_on = [i for i in range(n) if i % 2 != half]
            best = max(scales, key=lambda name: (sum(variants[name]["relations"][r]["correct"][i] for i in chosen_on),
                                                 -abs(scales[name] - default)))
            for i in range(half, n, 2):
                correct[i] = variants[best]["relations"][r]["correct"][i]
        per_relation[r] = {"correct": correct, "n_train": reference["n_train"]}
    settings = {"scale": f"per relation, chosen on the other half of its questions from {len(scales)} scales"}
    return {"settings": settings, "train_seconds": 0.0, "relations": per_relation}


def merge(out: Path, model: str, name: str, record: dict) -> None:
    """Write one variant's record into the variants file `out` (merged under a lock)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(out.with_suffix(".lock"), "merges a variant"):
        data = json.loads(out.read_text()) if out.exists() else {"model": model, "split": "validation",
                                                                    "metric": "first-word exact match", "variants": {}}
        data["variants"][name] = record
        atomic_write_text(out, json.dumps(data, indent=1) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--variants", nargs="*", default=[])
    parser.add_argument("--relations", nargs="*", default=None)
    parser.add_argument("--out", help="the variants file (default: research/results/ffv-variants-<model>.json)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS and v not in REFERENCE_VARIANTS and v != PER_RELATION_SCALE]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(REFERENCE_VARIANTS + tuple(VARIANTS))}, {PER_RELATION_SCALE}")
    out = Path(args.out) if args.out else variant_file(args.model)
    if PER_RELATION_SCALE in args.variants:
        recorded = json.loads(out.read_text())["variants"] if out.exists() else {}
        merge(out, args.model, PER_RELATION_SCALE, per_relation_scale(recorded))
        args.variants = [v for v in args.variants if v != PER_RELATION_SCALE]
        if not args.variants:
            return
    relations_names = args.relations or project_relations()
    screen = test_screen(data_dir_from_env())
    relations = {r: screened(load_project_relation(r), screen, lambda m: None) for r in relations_names}
    empty = [r for r in relations_names if not relations[r].validation]
    if empty:  # refused before any model work, not after a variant's training
        sys.exit(f"no validation questions left for {', '.join(empty)}: FFV_DATA_DIR screens out pairs shared with "
                 "its analogy test sets, and the records (like the shipped FFVs) use the project pairs unscreened; "
                 "unset FFV_DATA_DIR")
    starts = {r: load_vector(shipped_path(args.model, "fv", r)) for r in relations_names}
    shipped = {r: load_vector(shipped_path(args.model, "ffv", r)) for r in relations_names}  # read once, for every variant
    shipped_inits = {s.metadata.get("init") for s in shipped.values()}
    model, tokenizer = load_model_and_tokenizer(args.model)
    patcher = Patcher(model)
    device = input_device(model)
    for name in args.variants:
        began = time.perf_counter()
        vectors: dict[str, torch.Tensor | None] = {}
        layers = {r: starts[r].metadata["layer"] for r in relations_names}
        changes = dict(VARIANTS.get(name, {}))
        # a variant that changes only the scale of the shipped FFVs' own start rescales them
        rescaled = (changes and set(changes) <= {"scale", "init"}
                    and shipped_inits == {changes.get("init", TrainingSettings().init)})
        if name == VARIANT_BASELINE or rescaled:
            for r in relations_names:
                stored = shipped[r]
                rescale = changes.get("scale", stored.metadata["scale"]) / stored.metadata["scale"]
                vectors[r], layers[r] = stored.vector * rescale, stored.metadata["layer"]
        elif name == PROMPTING_VARIANT:
            vectors = {r: None for r in relations_names}
        else:
            if "layer" in changes:
                layers = {r: changes["layer"] for r in relations_names}
            settings = dataclasses.replace(TrainingSettings(), **{k: v for k, v in changes.items() if k not in SCRIPT_ONLY})
            by_layer: dict[int, list[str]] = {}
            for r in relations_names:
                by_layer.setdefault(layers[r], []).append(r)
            for layer, group in sorted(by_layer.items()):
                pair_lists = [list(relations[r].train)[: settings.n_pairs] for r in group]
                initials = torch.stack([starts[r].vector for r in group])
                if changes.get("trained") is False:  # the start itself, as it is
                    vectors.update(zip(group, (v.cpu() for v in starting_vectors(patcher, tokenizer, pair_lists, layer,
                                                                                 initials, settings))))
                    continue
                results = train_function_vectors(patcher, tokenizer, pair_lists, layer, initials,
                                                 dataclasses.replace(settings, n_pairs=min(len(p) for p in pair_lists)))
                for r, res in zip(group, results):
                    vectors[r] = res.vector
        trained = time.perf_counter() - began
        per_relation = {}
        for r in relations_names:
            pairs = list(relations[r].validation)
            if name == PROMPTING_VARIANT:
                rng = random.Random(1234)
                prompts = [fewshot_prompt(rng.sample(list(relations[r].train), N_SHOT), p.input) for p in pairs]
                texts = generations(patcher, tokenizer, prompts)
            else:
                texts = generations(patcher, tokenizer, [query_text(p.input) for p in pairs], layers[r],
                                    vectors[r].to(device))
            per_relation[r] = {"correct": score(texts, pairs), "n_train": len(relations[r].train)}
        recorded = {k: "all" if k == "n_pairs" and v == ALL_PAIRS else v for k, v in VARIANTS.get(name, {}).items()}
        record = {"settings": recorded, "train_seconds": round(trained, 1), "relations": per_relation}
        correct = [c for v in per_relation.values() for c in v["correct"]]
        print(f"{name}: validation exact match {sum(correct) / len(correct):.3f} over {len(correct)} questions "
              f"(trained in {trained:.0f}s)", flush=True)
        merge(out, args.model, name, record)


if __name__ == "__main__":
    main()
