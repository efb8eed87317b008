"""The figures of docs/results.md, generated from the committed results so that no sentence can
contradict them: each block between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->` is
rebuilt from the files it names (the leaderboards' lm-eval results, each basis's composite.json,
the alignment reports). `python -m ffv_eval.reports.results_page` rewrites the blocks;
`--check` exits 1, naming the blocks, when the page and the results disagree (the test suite
runs the check).

Blocks:
    relations       per model, the mean over the relation tasks of each condition, and the
                    FFV against each other condition task by task, paired over the same
                    questions where both runs logged samples
    analogies       per model and task, unpatched against the CFV: each metric's paired gain,
                    95% bootstrap interval and McNemar p (the analogies leaderboard's rows)
    overlap         per model and analogy task, the test documents sharing a word pair with
                    the CFV's training pairs, as the run recorded it
    cfv_settings    per model, how the CFV's settings were chosen on validation data (the valid
                    splits of the question sets, relations held out of the basis), and what they
                    gave on the other held-out relations
    alignment       per model, FV and FFV against human relational-similarity judgments
    ffv_variants    per model, every FFV training variant tried on the relations' validation
                    splits (research/ffv_training_variants.py), paired against the shipped FFVs
    cfv_layers      per model with a layer search (research/cfv_layer_search.py), each layer's
                    basis and the settings chosen there, on the validation questions, and
                    whether the shipped basis is the one chosen"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ffv_eval import VECTORS_DIR
from ffv_eval.files.atomic import atomic_write_text
from ffv_eval.reports.leaderboard_render import metric_label
from ffv_eval.reports.leaderboard_results import Leaderboard, build_leaderboard, read_outcomes
from ffv_eval.reports.paired import PairingError, match_outcomes, paired_gain, signed_interval

ROOT = VECTORS_DIR.parent
PAGE = ROOT / "docs" / "results.md"
RELATIONS_RESULTS = ROOT / "leaderboards" / "results" / "relations"
ANALOGY_RESULTS = ROOT / "leaderboards" / "results" / "analogies"
VARIANT_RESULTS = ROOT / "research" / "results"
VARIANT_BASELINE = "shipped"  # the variants are paired against the shipped FFVs
PROMPTING_VARIANT = "10-shot"  # no vector: the relation's 10-shot prompt, the baseline an FFV must beat
REFERENCE_VARIANTS = (VARIANT_BASELINE, PROMPTING_VARIANT)  # scored, not trained; research/ffv_training_variants.py runs them
MODELS = ("gemma-3-270m", "smollm2-135m")
ANALOGY_METRICS = ("acc", "acc_norm", "acc_d", "top_answer", "repeats_abc")
BLOCK = re.compile(r"(<!-- generated:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 1e-3 else f"{value:.0e}"


def relations_block(board: Leaderboard) -> str:
    """Mean score per model and condition over the relation tasks every condition has, and the
    FFV against each other condition, task by task and paired over questions where possible."""
    cells = board.by_cell()
    out = []
    for model in board.models:
        conditions = [c for m, c in board.rows() if m == model]
        tasks = [t for t in board.tasks if all((model, c, t) in cells for c in conditions)]
        out.append(f"**{model}**, {len(tasks)} relations, test pairs of the project's data:\n")
        rows = []
        for condition in conditions:
            scores = [cells[(model, condition, t)].value for t in tasks]
            rows.append([condition, f"{statistics.fmean(scores):.3f}", *_versus(cells, model, "ffv", condition, tasks)])
        out.append(_table(["condition", "mean exact match", "FFV ahead / behind (tasks)", "FFV minus it, pooled over questions [95% CI]", "p"],
                          rows))
    return "\n".join(out)


def _versus(cells, model: str, ours: str, other: str, tasks: Sequence[str]) -> list:
    """[ahead / behind counts, pooled paired gain with interval, p] of `ours` against `other`."""
    if ours == other or (model, ours, tasks[0]) not in cells:
        return ["", "", ""]
    mine = [cells[(model, ours, t)].value for t in tasks]
    theirs = [cells[(model, other, t)].value for t in tasks]
    counts = f"{sum(a > b for a, b in zip(mine, theirs))} / {sum(a < b for a, b in zip(mine, theirs))}"
    treated, base = [], []
    for t in tasks:
        a, b = cells[(model, ours, t)], cells[(model, other, t)]
        if a.samples is None or b.samples is None:
            return [counts, "not paired: a run without per-question samples", ""]
        try:  # each task's samples read once, matched question by question
            mine_t, theirs_t = match_outcomes(read_outcomes(a)[a.metric], read_outcomes(b)[b.metric])
        except PairingError as err:
            return [counts, f"not paired: {err}", ""]
        treated += list(mine_t)
        base += list(theirs_t)
    gain = paired_gain(treated, base)
    return [counts, f"{signed_interval(gain.mean_gain, gain.ci95)} (n = {gain.n})", _p(gain.p_value)]


def analogies_block(board: Leaderboard) -> str:
    rows = []
    for row in board.paired_gains:
        if row.patched.condition != "cfv" or row.metric not in ANALOGY_METRICS:
            continue
        p = row.patched
        interval = signed_interval(row.gain, row.paired.ci95) if row.paired else row.note
        rows.append([p.model, f"{p.task} ({p.n_samples})", metric_label(row), f"{row.unpatched.scores[row.metric]:.3f}",
                     f"{p.scores[row.metric]:.3f}", interval, _p(row.paired.p_value) if row.paired else ""])
    return _table(["model", "task (n)", "metric", "unpatched", "CFV", "gain [95% CI]", "p"], rows)


def overlap_block(board: Leaderboard) -> str:
    rows = [[e.model, e.task, e.vector.overlap_text()] for e in board.entries if e.condition == "cfv" and e.vector is not None]
    return _table(["model", "task", "test documents sharing a pair with the CFV's training pairs"], rows)


def cfv_settings_block(models: Sequence[str] = MODELS, vectors_dir: Path = VECTORS_DIR) -> str:
    out = []
    for model in models:
        meta = json.loads((vectors_dir / model / "basis" / "composite.json").read_text())
        choice, validation, questions = meta["posterior_choice"], meta.get("validation"), meta.get("validation_questions")
        margin = choice.get("no_relation")  # absent from maps chosen before the no-relation option
        setting = (f"{choice['posterior']} posterior, {choice['map']} map, top_k {choice['top_k']}, scale {choice['scale']:g}"
                   + ("" if margin is None else f", no-relation option at margin {margin:g}"))
        if not validation and not questions:
            out.append(f"**{model}** ({len(meta['basis'])} basis relations): {setting}, chosen by {choice['by']}.\n")
            continue
        out.append(f"**{model}** ({len(meta['basis'])} basis relations): {setting}, chosen by {choice['by']}.")
        by_question = {_candidate_key(c): c["acc_d"] for c in questions["candidates"]} if questions else {}
        if questions:
            sets = questions["sets"]
            chosen = by_question[_candidate_key(choice)]
            counts = ", ".join(f"{name} {questions['questions'][name]}" for name in sets)
            per_set = ", ".join(f"{name} {questions['unpatched'][name]:.3f} to {chosen[name]:.3f}" for name in sets)
            out.append(f"On {sum(questions['questions'].values())} validation questions ({counts}; {questions['split']} splits), "
                       f"mean acc_d over the sets: unpatched {questions['unpatched']['mean']:.3f}, chosen {chosen['mean']:.3f} "
                       f"({per_set}).")
        by_relation = {}
        if validation:
            choosing, reporting = validation["choosing"], validation["reporting"]
            by_relation = {_candidate_key(c): c for c in choosing["candidates"]}
            out.append(f"Held out of the basis (which then held {validation['basis_relations']} relations): "
                       f"{choosing['analogies']} analogies of {len(choosing['relations'])} relations scored every candidate "
                       f"(first-token accuracy of D, unpatched {choosing['unpatched']['accuracy']:.3f}); "
                       f"{reporting['analogies']} analogies of {len(reporting['relations'])} other relations report the choice:\n")
            rows = [["unpatched", f"{reporting['unpatched']['accuracy']:.3f}", f"{reporting['unpatched']['repeats_abc']:.3f}"],
                    ["chosen", f"{reporting['chosen']['accuracy']:.3f}", f"{reporting['chosen']['repeats_abc']:.3f}"]]
            if reporting.get("paper"):
                rows.append(["the paper's (softmax, fitted map)", f"{reporting['paper']['accuracy']:.3f}",
                             f"{reporting['paper']['repeats_abc']:.3f}"])
            out.append(_table(["reporting relations", "first-token accuracy of D", "repeats A, B or C"], rows))
        sets = questions["sets"] if questions else []
        names = list(dict.fromkeys([*by_question, *by_relation]))
        names.sort(key=lambda n: (-by_question[n]["mean"] if n in by_question else 0.0, -by_relation[n]["accuracy"] if n in by_relation else 0.0))
        header = ["posterior", "map", "top_k", "scale", "no-relation margin"] + (["acc_d, mean of sets", *sets] if sets else []) + (
            ["relations: accuracy", "repeats A, B or C"] if by_relation else [])
        rows = []
        for n in names:
            row = [n[0], n[1], n[2], f"{n[3]:g}", "none" if n[4] is None else f"{n[4]:g}"]
            if sets:
                row += [f"{by_question[n][x]:.3f}" for x in ("mean", *sets)] if n in by_question else [""] * (1 + len(sets))
            if by_relation:
                row += [f"{by_relation[n]['accuracy']:.3f}", f"{by_relation[n]['repeats_abc']:.3f}"] if n in by_relation else ["", ""]
            rows.append(row)
        out.append("<details><summary>every candidate, on the validation questions and the choosing relations</summary>\n\n"
                   + _table(header, rows) + "\n</details>\n")
    return "\n".join(out)


CANDIDATE_FIELDS = ("posterior", "map", "top_k", "scale", "no_relation")  # a CFV candidate's settings in composite.json


def candidate_setting(candidate: dict) -> dict:
    """A CFV candidate's settings (composite.json's posterior_choice or one of its candidates;
    no_relation is absent from maps chosen before that option: None)."""
    return {k: candidate.get(k) for k in CANDIDATE_FIELDS}


def find_candidate(candidates: Sequence[dict], setting: dict) -> dict | None:
    """The candidate with these settings, or None."""
    return next((c for c in candidates if candidate_setting(c) == setting), None)


def _candidate_key(candidate: dict) -> tuple:
    return tuple(candidate_setting(candidate).values())


def alignment_block(models: Sequence[str] = MODELS, leaderboards: Path = ROOT / "leaderboards") -> str:
    rows = []
    for model in models:
        sets = json.loads((leaderboards / f"alignment-{model}.json").read_text())["sets"]
        for kind, figures in sets.items():
            relsim, semeval = figures["relsim"], figures["semeval_prototypicality"]
            rows.append([model, kind.upper(), f"{relsim['spearman']:.3f} [{relsim['ci95'][0]:.3f}, {relsim['ci95'][1]:.3f}]",
                         f"{semeval['mean_spearman']:.3f} [{semeval['ci95'][0]:.3f}, {semeval['ci95'][1]:.3f}]"])
    return _table(["model", "vectors", "relsim Spearman [95% CI]", "SemEval prototypicality Spearman [95% CI]"], rows)


def variant_file(model: str, directory: Path = VARIANT_RESULTS) -> Path:
    return directory / f"ffv-variants-{model}.json"


def layer_search_file(model: str, directory: Path = VARIANT_RESULTS) -> Path:
    return directory / f"cfv-layers-{model}.json"


def _research_records(models: Sequence[str], file_of: Callable[[str], Path]):
    """(model, path, its JSON) for each model whose research results file exists."""
    for model in models:
        path = file_of(model)
        if path.exists():
            yield model, path, json.loads(path.read_text())


def cfv_layers_block(models: Sequence[str] = MODELS, directory: Path = VARIANT_RESULTS, vectors_dir: Path = VECTORS_DIR) -> str:
    """Per model with a layer search: each layer's chosen CFV settings and their acc_d on the
    validation questions, and whether the shipped basis (its layer and settings, read from its
    composite.json) is the search's choice."""
    out = []
    for model, _, search in _research_records(models, lambda m: layer_search_file(m, directory)):
        layers = search["layers"]
        shipped = json.loads((vectors_dir / model / "basis" / "composite.json").read_text())
        chosen = layers[str(search["chosen_layer"])]
        shipped_setting = candidate_setting(shipped["posterior_choice"])
        is_chosen = shipped["layer"] == search["chosen_layer"] and shipped_setting == chosen["chosen"]
        sets = [name for name in chosen["unpatched"] if name != "mean"]
        counts = ", ".join(f"{name} {chosen['questions'][name]}" for name in sets)
        out.append(f"**{model}**: layer {search['chosen_layer']} chosen ({search['by']}; the FFVs' layer is "
                   f"{search['ffv_layer']}). " + ("The shipped basis is that layer's, with those settings. " if is_chosen else
                   f"**Not shipped yet:** the shipped basis and map (layer {shipped['layer']}, {_setting_text(shipped_setting)}) "
                   f"are what the test figures above were run with. ") +
                   f"Validation questions: {counts} ({search['split']} splits), {search['metric']}:\n")
        rows = [["unpatched", "", "", f"{chosen['unpatched']['mean']:.3f}", *(f"{chosen['unpatched'][x]:.3f}" for x in sets), ""]]
        for n, r in layers.items():
            held = r.get("held_out")
            rows.append([f"layer {n}" + (" (chosen)" if int(n) == search["chosen_layer"] else ""), r["basis_relations"],
                         f"{_setting_text(r['chosen'])} (of {r['candidates']})",
                         f"{r['acc_d']['mean']:.3f}", *(f"{r['acc_d'][x]:.3f}" for x in sets),
                         f"{held['unpatched']:.3f} to {held['chosen']:.3f} ({held['analogies']})" if held and held["chosen"] is not None else ""])
        if not is_chosen and shipped.get("validation_questions"):
            found = find_candidate(shipped["validation_questions"]["candidates"], shipped_setting)
            if found is not None:
                acc = found["acc_d"]
                rows.append([f"shipped (layer {shipped['layer']})", len(shipped["basis"]), _setting_text(shipped_setting),
                             f"{acc['mean']:.3f}", *(f"{acc[x]:.3f}" for x in sets), ""])
        out.append(_table(["basis", "relations", "settings chosen there", "acc_d, mean of sets", *sets,
                           "relations held out of the basis: first-token accuracy of D, unpatched to these settings (analogies)"], rows))
    return "\n".join(out)


def _setting_text(c: dict) -> str:
    margin = c.get("no_relation")
    return (f"{c['posterior']}, {c['map']}, top_k {c['top_k']}, scale {c['scale']:g}, no-relation "
            f"{'none' if margin is None else format(margin, 'g')}")


def _variant_outcomes(record: dict, base: dict, where: str) -> list[float]:
    """A variant's 0/1 outcomes in the baseline's order of relations and questions."""
    if record["relations"].keys() != base.keys() or any(
            len(record["relations"][r]["correct"]) != len(base[r]["correct"]) for r in base):
        raise PairingError(f"{where} scored other relations or questions than '{VARIANT_BASELINE}'")
    return [x for r in base for x in record["relations"][r]["correct"]]


def ffv_variants_block(models: Sequence[str] = MODELS, directory: Path = VARIANT_RESULTS) -> str:
    """Per model with a variants file: each variant's mean over the relations, and its gain over
    the shipped FFVs paired over the same validation questions."""
    out = []
    for model, path, data in _research_records(models, lambda m: variant_file(m, directory)):
        variants = data["variants"]
        if VARIANT_BASELINE not in variants:
            raise PairingError(f"{path}: no '{VARIANT_BASELINE}' variant to pair the others against")
        base = variants[VARIANT_BASELINE]["relations"]
        outcomes = {name: _variant_outcomes(record, base, f"{path}: variant '{name}'") for name, record in variants.items()}
        rows = []
        for name, record in sorted(variants.items(), key=lambda kv: -statistics.mean(outcomes[kv[0]])):
            values = outcomes[name]
            settings = ", ".join(f"{k} {v}" for k, v in record["settings"].items())
            row = [name, settings or "(defaults)" if name not in REFERENCE_VARIANTS else "(reference)",
                   f"{statistics.mean(values):.3f}"]
            if name == VARIANT_BASELINE:
                row += ["", ""]
            else:
                gain = paired_gain(values, outcomes[VARIANT_BASELINE])
                row += [signed_interval(gain.mean_gain, gain.ci95), _p(gain.p_value)]
            trained = name not in REFERENCE_VARIANTS and record["train_seconds"]
            rows.append(row + [f"{record['train_seconds']:.0f}" if trained else ""])
        n = len(outcomes[VARIANT_BASELINE])
        out.append(f"**{model}**, {len(base)} relations, {n} validation questions ({data['metric']}):\n")
        out.append(_table(["variant", "settings changed", "mean", f"minus {VARIANT_BASELINE} [95% CI]", "p", "training s"], rows))
    return "\n".join(out)


def blocks() -> dict[str, Callable[[], str]]:
    """Block name -> what builds it (boards are read once, lazily)."""
    boards: dict[Path, Leaderboard] = {}

    def board(path: Path) -> Leaderboard:
        if path not in boards:
            boards[path] = build_leaderboard([path])
        return boards[path]

    return {"relations": lambda: relations_block(board(RELATIONS_RESULTS)),
            "analogies": lambda: analogies_block(board(ANALOGY_RESULTS)),
            "overlap": lambda: overlap_block(board(ANALOGY_RESULTS)),
            "cfv_settings": cfv_settings_block,
            "alignment": alignment_block,
            "ffv_variants": ffv_variants_block,
            "cfv_layers": cfv_layers_block}


def render(text: str, builders: dict[str, Callable[[], str]] | None = None) -> tuple[str, list[str]]:
    """`text` with every generated block rebuilt, and the names of the blocks that changed. A
    block with no builder is an error naming it."""
    builders = builders or blocks()
    changed = []

    def rebuild(match: re.Match) -> str:
        name = match["name"]
        if name not in builders:
            raise KeyError(f"{PAGE}: generated block '{name}' has no builder (known: {', '.join(builders)})")
        body = builders[name]()
        if body != match["body"]:
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(rebuild, text), changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from the results (write nothing)")
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    text = args.page.read_text()
    new, changed = render(text)
    if args.check:
        if changed:
            print(f"{args.page}: generated blocks out of date: {', '.join(changed)}; run python -m ffv_eval.reports.results_page")
            return 1
        print(f"{args.page}: every generated block matches the results")
        return 0
    if changed:
        atomic_write_text(args.page, new)
    print(f"{args.page}: {'rewrote ' + ', '.join(changed) if changed else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
