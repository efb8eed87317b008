"""`ffv explain-cfv`: evidence of what a composite function vector (CFV) did to the questions of
one analogy task, side by side with the unpatched model. No running of lm-eval.

Input: a results directory written by `ffv leaderboard --run` (lm-eval's `--output_path` layout
with `--log_samples`, read by `leaderboard_results`): the newest unpatched run and the newest
CFV run (condition `cfv`, else `auto`, which gives analogy tasks a CFV per question) of one
model and task, paired question by question on doc_id and doc_hash (`paired.match_outcomes`).

Per question, all read from the two samples files: the source pair A:B and C (multiple choice:
the choices, the correct one marked); each condition's answer and whether it is right. For
completion tasks that is the generation (`filtered_resps`) with its `top_answer`, `human_share`
and `repeats_abc`; for the one-shot multiple-choice tasks the choice picked under acc (argmax
of the n whole continuations `Q: C\\nA: D`) and under acc_d (argmax of whole minus C part: the
2n log-likelihoods `data.analogies.one_shot_choices` asks for), checked against the metric the
sample logged. Then the top basis relations of the CFV's posterior with their weights (the
model loaded with the run's basis: `CompositeVectors.explain`), and the prompt with ⟨+CFV⟩ at
the token where ffv-patched added the vector: a completion's last prompt token
(`Q: C\\nA:⟨+CFV⟩`), in a multiple-choice continuation the token that predicts D's first token
(`Q: C\\nA:⟨+CFV⟩ D`). A summary on top counts the questions the CFV won (right only patched),
lost (right only unpatched) and left unchanged, per metric, and for completion tasks the
answers that repeat A, B or C under each condition. The report is Markdown."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ffv_eval.errors import FFVError, SettingError
from ffv_eval.files.atomic import atomic_write_text, check_writable
from ffv_eval.reports.leaderboard_results import Entry, condition_sort_key, condition_spec, display_path, newest_entries, read_entries, sample_lines
from ffv_eval.reports.paired import Outcome, match_outcomes

MARKER = "⟨+CFV⟩"
PATCHED_CONDITIONS = ("cfv", "auto")  # the conditions whose analogy questions got a CFV (see find_runs), preferred first
SELECTIONS = ("all", "lost", "won", "changed")
DEFAULT_LIMIT = 20
DEFAULT_TOP = 5
CHOICE_METRICS = ("acc", "acc_d")  # picks of a multiple-choice question that the report shows
COMPLETION_METRIC = "top_answer"


class EvidenceError(FFVError, ValueError):
    """Results that cannot show what a CFV did: a missing run, task or samples file, or samples
    that do not read as an analogy task's (the message names the file, line and the fix)."""


@dataclass(frozen=True)
class Answer:
    """One condition's answer to one question."""

    right: dict[str, bool]  # metric -> right (acc, acc_d; top_answer)
    picks: dict[str, int] = field(default_factory=dict)  # multiple choice: metric -> index of the chosen choice
    generation: str | None = None  # completion tasks
    repeats_abc: bool | None = None  # completion tasks: the answer is A, B or C itself
    human_share: float | None = None  # completion tasks: share of people who gave that answer


@dataclass(frozen=True)
class Question:
    """One question under both conditions."""

    doc_id: int
    doc: dict
    prompt: str  # lm-eval's prompt, with MARKER where the vector was added
    unpatched: Answer
    patched: Answer

    @property
    def choices(self) -> list | None:
        return self.doc.get("choices")

    def outcome(self, metric: str) -> str:
        """won (right only with the CFV), lost (right only without) or unchanged."""
        before, after = self.unpatched.right[metric], self.patched.right[metric]
        return "won" if after and not before else "lost" if before and not after else "unchanged"

    def changed(self, metric: str) -> bool:
        """The answer differs: another choice picked under `metric`, or another generation."""
        if self.choices is not None:
            return self.unpatched.picks[metric] != self.patched.picks[metric]
        return self.unpatched.generation != self.patched.generation


@dataclass(frozen=True)
class Posteriors:
    """The CFV's top basis relations per source pair, and what they were computed with."""

    rows: dict[tuple[str, str], list[tuple[str, float, float]]]  # (a, b) -> [(relation, posterior, weight)]
    basis_dir: Path
    posterior_kind: str
    model_fingerprint: str


# -- the two runs ------------------------------------------------------------------------------

def run_command(results_dir, model: str, task: str, limit: float | None = None) -> str:
    """The command that makes the runs this report reads."""
    limit_text = f" --limit {int(limit)}" if limit is not None else ""
    return f"ffv leaderboard {results_dir} --run {model} --tasks {task} --conditions unpatched cfv{limit_text}"


def find_runs(results_dir: str | os.PathLike, model: str, task: str, condition: str | None = None) -> tuple[Entry, Entry]:
    """(unpatched, CFV) entries: the newest of each for the model and task, both with samples."""
    entries, _ = read_entries([results_dir])
    mine = [e for e in entries if e.model == model]
    if not mine:
        models = ", ".join(sorted({e.model for e in entries}))
        raise EvidenceError(f"{results_dir}: no results of model {model} (models there: {models}); make them with: "
                            f"{run_command(results_dir, model, task)}")
    newest = newest_entries(e for e in mine if e.task == task)
    if not newest:
        tasks = ", ".join(sorted({e.task for e in mine}))
        raise EvidenceError(f"{results_dir}: no results of task {task} for {model} (its tasks there: {tasks}); make them "
                            f"with: {run_command(results_dir, model, task)}")
    base = newest.get((model, "unpatched", task))
    wanted = (condition,) if condition else PATCHED_CONDITIONS
    patched = next((newest[(model, c, task)] for c in wanted if (model, c, task) in newest), None)
    missing = [name for name, entry in (("unpatched", base), (" or ".join(wanted), patched)) if entry is None]
    if missing:
        present = ", ".join(sorted({c for _, c, _ in newest}, key=condition_sort_key))
        limit = next((e.limit for e in (base, patched) if e is not None), None)
        raise EvidenceError(f"{results_dir}: no {' and no '.join(missing)} results of {model} / {task} (conditions there: "
                            f"{present}); make them with: {run_command(results_dir, model, task, limit)}")
    # the vector the condition gave the task (its documents' source pairs are checked in pair_questions)
    used = condition_spec(patched.condition).for_task(task, docs_have_source_pair=True)
    if not used.is_composite:
        raise EvidenceError(f"{display_path(patched.source)}: the {patched.condition} run patched {task} with {used}, not with "
                            f"a composite vector: vector={patched.condition} gives a CFV to the analogy tasks only")
    for entry in (base, patched):
        if entry.samples is None:
            date = entry.source.stem.removeprefix("results_")
            raise EvidenceError(f"{display_path(entry.source)}: no samples file for task {task} (samples_{task}_{date}.jsonl "
                                f"beside it; the {entry.condition} run was made without --log_samples); make it again with: "
                                f"{run_command(results_dir, model, task, entry.limit)}")
    return base, patched


def read_samples(entry: Entry) -> dict[int, tuple[int, dict]]:
    """doc_id -> (line number, sample) of the entry's filter."""
    samples: dict[int, tuple[int, dict]] = {}
    for lineno, doc_id, line in sample_lines(entry, EvidenceError):
        if not isinstance(line.get("doc"), dict):
            raise EvidenceError(f"{entry.samples}: line {lineno}: field 'doc' should be an object (lm-eval's document)")
        samples[doc_id] = (lineno, line)
    return samples


# -- one sample: its answer and prompt ---------------------------------------------------------

def _request_args(line: dict, index: int, where: str) -> tuple:
    """The arguments of the sample's `index`-th request: lm-eval writes them as
    {"gen_args_<i>": {"arg_0": ..., "arg_1": ...}} (in memory: a list of tuples)."""
    arguments = line.get("arguments")
    if isinstance(arguments, dict) and isinstance(arguments.get(f"gen_args_{index}"), dict):
        args = arguments[f"gen_args_{index}"]
        return tuple(args[f"arg_{i}"] for i in range(len(args)))
    if isinstance(arguments, list) and index < len(arguments):
        return tuple(arguments[index])
    raise EvidenceError(f"{where}: field 'arguments' has no request {index} (lm-eval's gen_args_{index}: the prompt)")


def _is_choice_doc(doc: dict) -> bool:
    choices = doc.get("choices")
    return isinstance(choices, list) and bool(choices) and all(isinstance(c, list) and len(c) == 2 for c in choices)


def _loglikelihoods(line: dict, where: str) -> list[float]:
    """The log-likelihood of each request, from `filtered_resps` ([[ll, is_greedy], ...], the
    numbers as lm-eval writes them: often strings)."""
    values = line.get("filtered_resps")
    try:
        return [float(item[0]) for item in values]
    except (TypeError, ValueError, IndexError, KeyError) as err:
        raise EvidenceError(f"{where}: field 'filtered_resps' should hold [log-likelihood, is_greedy] per choice, "
                            f"got {json.dumps(values)[:120]}") from err


def _logged(line: dict, metric: str, where: str) -> float | None:
    value = line.get(metric)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EvidenceError(f"{where}: field '{metric}' should be a number, got {value!r}")
    return float(value)


def choice_answer(line: dict, where: str) -> Answer:
    """The choice picked under acc (argmax of the n whole continuations) and acc_d (argmax of
    whole minus C part, when the sample has the 2n log-likelihoods of one_shot_choices), as
    data.analogies.process_choice_results scores them; each pick is checked against the metric
    the sample logged."""
    doc = line["doc"]
    n, lls = len(doc["choices"]), _loglikelihoods(line, where)
    if len(lls) not in (n, 2 * n):
        raise EvidenceError(f"{where}: {len(lls)} log-likelihoods for {n} choices; expected {n}, or {2 * n} (each "
                            f"choice, then its C part: the one-shot analogy tasks)")
    whole = np.array(lls[:n])
    picks = {"acc": int(np.argmax(whole))}
    if len(lls) == 2 * n:
        picks["acc_d"] = int(np.argmax(whole - np.array(lls[n:])))
    right = {}
    for metric, pick in picks.items():
        right[metric] = pick == int(doc["answer"])
        logged = _logged(line, metric, where)
        if logged is not None and logged != float(right[metric]):
            raise EvidenceError(f"{where}: field '{metric}' is {logged:g}, but its log-likelihoods pick choice {pick + 1} "
                                f"and the answer is {int(doc['answer']) + 1}: the samples were scored differently from "
                                f"the task's process_choice_results; rerun the task")
    return Answer(right=right, picks=picks)


def completion_answer(line: dict, where: str) -> Answer:
    """The generation and its logged top_answer, human_share and repeats_abc."""
    responses = line.get("filtered_resps")
    generation = responses[0] if isinstance(responses, list) and responses else None
    if not isinstance(generation, str):
        raise EvidenceError(f"{where}: field 'filtered_resps' should hold the generation (a string), got "
                            f"{json.dumps(responses)[:120]}")
    top = _logged(line, COMPLETION_METRIC, where)
    if top is None:
        raise EvidenceError(f"{where}: field '{COMPLETION_METRIC}' is missing (the analogy completion tasks log it)")
    repeats = _logged(line, "repeats_abc", where)
    return Answer(right={COMPLETION_METRIC: top == 1.0}, generation=generation,
                  repeats_abc=None if repeats is None else repeats == 1.0, human_share=_logged(line, "human_share", where))


def marked_prompt(line: dict, where: str) -> str:
    """lm-eval's prompt with MARKER where ffv-patched added the vector: after a completion's
    prompt; in a multiple-choice question inside the correct choice's continuation `Q: C\\nA: D`,
    after the token before D (the one that predicts D's first token; every choice is patched
    at its own such token)."""
    doc = line["doc"]
    if not _is_choice_doc(doc):
        return str(_request_args(line, 0, where)[0]) + MARKER
    answer = int(doc["answer"])
    context, continuation = (str(x) for x in _request_args(line, answer, where)[:2])
    d = str(doc["choices"][answer][1])
    text = continuation.rstrip()
    if not text.endswith(d):
        raise EvidenceError(f"{where}: the continuation {continuation!r} of choice {answer + 1} does not end with its "
                            f"D {d!r}; explain-cfv reads the one-shot analogy tasks (Q: C\\nA: D)")
    head = text[: len(text) - len(d)].rstrip()
    return context + head + MARKER + continuation[len(head):]


def pair_questions(base: Entry, patched: Entry) -> list[Question]:
    """The questions of both runs, matched on doc_id and doc_hash, in doc_id order."""
    runs = read_samples(base), read_samples(patched)
    names = f"unpatched ({display_path(base.samples)})", f"{patched.condition} ({display_path(patched.samples)})"
    outcomes = [[Outcome(i, line.get("doc_hash") if isinstance(line.get("doc_hash"), str) else None, 0.0)
                 for i, (_, line) in run.items()] for run in runs]
    match_outcomes(outcomes[1], outcomes[0], names[1], names[0])  # the same questions, or a PairingError saying how not
    questions = []
    for doc_id in sorted(runs[0]):
        (base_lineno, base_line), (lineno, line) = runs[0][doc_id], runs[1][doc_id]
        where, base_where = f"{patched.samples}: line {lineno}", f"{base.samples}: line {base_lineno}"
        doc = line["doc"]
        if not all(isinstance(doc.get(k), str) for k in ("a", "b")):
            raise EvidenceError(f"{where}: document {doc_id} has no source pair (fields 'a' and 'b'): task {patched.task} "
                                f"is not an analogy task, and a CFV is made from a source pair")
        read = choice_answer if _is_choice_doc(doc) else completion_answer
        questions.append(Question(doc_id, doc, marked_prompt(line, where), read(base_line, base_where), read(line, where)))
    return questions


def select(questions: Sequence[Question], only: str, metric: str, limit: int) -> list[Question]:
    """The first `limit` questions (doc_id order) that `only` asks for: all, lost, won, or
    changed (another answer)."""
    if only == "changed":
        chosen = [q for q in questions if q.changed(metric)]
    elif only in ("won", "lost"):
        chosen = [q for q in questions if q.outcome(metric) == only]
    else:
        chosen = list(questions)
    return chosen[:limit]


# -- the posterior -------------------------------------------------------------------------------

def _posterior_notes(posteriors: Posteriors, patched: Entry) -> list[str]:
    """Where today's basis or model differ from the run's (the posterior shown is today's)."""
    from ffv_eval.files.hashes import vector_sha256

    notes = []
    recorded = patched.vector.sha256 if patched.vector else None
    if recorded and vector_sha256(posteriors.basis_dir) != recorded:
        notes.append(f"the basis {display_path(posteriors.basis_dir)} is not the one the run used (sha256 "
                     f"{recorded[:12]}...): the posteriors shown are of today's basis")
    if patched.model_fingerprint and posteriors.model_fingerprint != patched.model_fingerprint:
        notes.append(f"the model loaded (fingerprint {posteriors.model_fingerprint}) is not the run's "
                     f"({patched.model_fingerprint})")
    return notes


def run_basis_dir(patched: Entry) -> Path | None:
    """The basis directory the run recorded, where it exists here."""
    path = patched.vector.path if patched.vector else None
    return Path(path) if path and Path(path).is_dir() else None


# -- Markdown ----------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _mark(right: bool) -> str:
    return "✔" if right else "✘"


def _choice_text(doc: dict, index: int) -> str:
    c, d = doc["choices"][index]
    return f"{index + 1}. {c} : {d}"


def _fence(text: str) -> str:
    ticks = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{ticks}text\n{text}\n{ticks}"


def _percent(values: Sequence[bool]) -> str:
    return f"{100 * sum(values) / len(values):.1f}%" if values else "n/a"


def summary_lines(questions: Sequence[Question], condition: str, metrics: Sequence[str]) -> list[str]:
    lines = []
    for metric in metrics:
        outcomes = [q.outcome(metric) for q in questions]
        lines.append(f"- **{metric}**: {condition} won {outcomes.count('won')}, lost {outcomes.count('lost')}, "
                     f"unchanged {outcomes.count('unchanged')} (unpatched {_percent([q.unpatched.right[metric] for q in questions])}, "
                     f"{condition} {_percent([q.patched.right[metric] for q in questions])}); answers changed: "
                     f"{sum(q.changed(metric) for q in questions)}")
    if questions and questions[0].choices is None:
        counts = [sum(bool(getattr(q, side).repeats_abc) for q in questions) for side in ("unpatched", "patched")]
        lines.append(f"- **answers repeating A, B or C**: unpatched {counts[0]}, {condition} {counts[1]} (of {len(questions)})")
    return lines


def question_lines(q: Question, condition: str, metric: str, metrics: Sequence[str],
                   relations: list[tuple[str, float, float]] | None) -> list[str]:
    doc = q.doc
    lines = [f"## Document {q.doc_id}: {q.outcome(metric)} ({metric}{', answer changed' if q.changed(metric) else ''})", ""]
    if q.choices is not None:
        answer = int(doc["answer"])
        lines.append(f"Source pair A : B = **{doc['a']} : {doc['b']}**; choices C : D (✔ the correct one):")
        lines.append("")
        lines.extend(f"- {_choice_text(doc, i)}{' ✔' if i == answer else ''}" for i in range(len(q.choices)))
        rows = [(m, *(f"{_cell(_choice_text(doc, a.picks[m]))} {_mark(a.right[m])}" for a in (q.unpatched, q.patched)))
                for m in metrics]
    else:
        people = ", ".join(f"{a} ({n})" for a, n in list(zip(doc.get("answers", []), doc.get("counts", [])))[:3])
        lines.append(f"Source pair A : B = **{doc['a']} : {doc['b']}**, C = **{doc['c']}**; people's top answers: {people or 'none'}")
        rows = [("generation", *(f"`{_cell(json.dumps(a.generation, ensure_ascii=False))}` {_mark(a.right[COMPLETION_METRIC])}"
                                 for a in (q.unpatched, q.patched))),
                ("human_share", *(f"{a.human_share:.2f}" if a.human_share is not None else "n/a" for a in (q.unpatched, q.patched))),
                ("repeats A, B or C", *({True: "yes", False: "no", None: "n/a"}[a.repeats_abc] for a in (q.unpatched, q.patched)))]
    lines += ["", f"| | unpatched | {condition} |", "|---|---|---|", *(f"| {name} | {u} | {p} |" for name, u, p in rows), ""]
    if relations is not None:
        lines += [f"CFV posterior for {doc['a']} : {doc['b']} (top {len(relations)}):", "",
                  "| basis relation | posterior | weight |", "|---|---:|---:|",
                  *(f"| {_cell(name)} | {posterior:.3f} | {weight:.3f} |" for name, posterior, weight in relations), ""]
    where = "the correct choice's continuation; each choice is patched before its own D" if q.choices is not None else \
        "at the last prompt token"
    lines += [f"Prompt, {MARKER} where the vector was added ({where}):", "", _fence(q.prompt), ""]
    return lines


def render(base: Entry, patched: Entry, questions: Sequence[Question], shown: Sequence[Question], only: str, metric: str,
           limit: int, posteriors: Posteriors | None, notes: Sequence[str] = ()) -> str:
    metrics = [m for m in CHOICE_METRICS if all(m in q.patched.picks and m in q.unpatched.picks for q in questions)] \
        if questions and questions[0].choices is not None else [COMPLETION_METRIC]
    lines = [f"# What the CFV did: {patched.task}, {patched.model}", "",
             f"{len(questions)} questions, unpatched ({display_path(base.source)}) against {patched.condition} "
             f"({display_path(patched.source)}); won: right only with the CFV, lost: right only without.", "",
             *summary_lines(questions, patched.condition, metrics), ""]
    if posteriors is not None:
        lines += [f"Posteriors: basis {display_path(posteriors.basis_dir)}, {posteriors.posterior_kind} posterior.", ""]
    lines += [f"Note: {note}" for note in notes] + ([""] if notes else [])
    lines += [f"Shown: {len(shown)} {'' if only == 'all' else only + ' '}question(s) by {metric} (--only {only}, "
              f"--limit {limit}), in doc_id order.", ""]
    for q in shown:
        relations = posteriors.rows.get((q.doc["a"], q.doc["b"])) if posteriors is not None else None
        lines += question_lines(q, patched.condition, metric, metrics, relations)
    return "\n".join(lines).rstrip() + "\n"


# -- the command ---------------------------------------------------------------------------------

def explain_cfv(results_dir: str | os.PathLike, model: str, task: str, limit: int = DEFAULT_LIMIT, only: str = "all",
                output: str | os.PathLike | None = None, condition: str | None = None, metric: str | None = None,
                top: int = DEFAULT_TOP, basis_dir=None, placement=None,
                posteriors_of: Callable[..., Posteriors] | None = None, print_=print) -> str:
    """The report for one model and task of `results_dir`, written atomically to `output`, else
    printed. `top` basis relations per question (0: no posterior, no model loaded), computed by
    `posteriors_of` (evaluation.cfv_posteriors.cfv_posteriors loads the model); `basis_dir`
    (default: the one the run recorded, where it exists here, else the model's own)."""
    if limit < 1:
        raise SettingError(f"--limit {limit}: expected a number of documents, at least 1")
    if top < 0:
        raise SettingError(f"--top {top}: expected 0 (no posterior) or more basis relations")
    if only not in SELECTIONS:
        raise SettingError(f"--only {only!r}: expected one of {', '.join(SELECTIONS)}")
    if condition is not None and condition not in PATCHED_CONDITIONS:
        raise SettingError(f"--condition {condition!r}: expected one of {', '.join(PATCHED_CONDITIONS)}")
    if output is not None:
        check_writable(output, "--output")
    base, patched = find_runs(results_dir, model, task, condition)
    questions = pair_questions(base, patched)
    metric = metric or (COMPLETION_METRIC if questions and questions[0].choices is None else base.metric)
    known = set.intersection(*(set(q.unpatched.right) & set(q.patched.right) for q in questions)) if questions else set()
    if metric not in known:
        raise SettingError(f"--metric {metric}: {task}'s samples give the answers under {', '.join(sorted(known)) or 'none'}")
    shown = select(questions, only, metric, limit)
    posteriors, notes = None, []
    if top and shown:
        stems = list(dict.fromkeys((q.doc["a"], q.doc["b"]) for q in shown))
        if posteriors_of is None:
            raise SettingError("the posteriors need a model: pass posteriors_of (ffv_eval.evaluation.cfv_posteriors), or top=0")
        posteriors = posteriors_of(model, stems, top, basis_dir or run_basis_dir(patched), placement)
        notes = _posterior_notes(posteriors, patched)
    report = render(base, patched, questions, shown, only, metric, limit, posteriors, notes)
    if output is not None:
        atomic_write_text(Path(output), report)
    else:
        print_(report, end="")
    return report
