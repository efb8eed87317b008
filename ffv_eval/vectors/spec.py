"""The `vector=` of ffv-patched as one value: VectorSpec parses every form of it once, says what
it names, and resolves the forms that depend on the task to the vector one task gets (the one
home of the `vector=auto` policy). The harness, the vector store, `ffv leaderboard --run` and
`ffv explain-cfv` all read vector= through it. Import-light (no torch).

The forms:

    auto (the default)  per task: a relation_<name> task gets that relation's FFV (ffv:<name>),
                        a task whose documents all have a source pair a:b (the analogy tasks) a
                        composite vector per question (cfv); any other task is an error
    none, empty, None   unpatched
    <name>              a shipped vector name: `antonym` (the FFV where there is one, else the
                        FV) or `<kind>:<relation>` (`fv:antonym`)
    <file>.safetensors  a vector file (also any path, or a name that is an existing file)
    <kind>:*            per task: each relation_<name> task gets `<kind>:<name>`
    cfv                 a composite vector per question, built from its document's source pair"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ffv_eval.errors import FFVError
from ffv_eval.vectors.library import BARE_NAME_KINDS, KINDS, VECTOR_SUFFIX

NONE, AUTO, COMPOSITE, NAME, FILE, EACH_RELATION = "none", "auto", "cfv", "name", "file", "each relation"
FORMS = (NONE, AUTO, COMPOSITE, NAME, FILE, EACH_RELATION)
AUTO_RELATION_KIND = "ffv"  # vector=auto: what a relation_<name> task gets
RELATION_TASK_PREFIX = "relation_"
WILDCARDS = "*?["  # a name is looked up as a file name pattern: these would match other vectors


class VectorNameError(FFVError, ValueError):
    """A vector name or spec (`antonym`, `fv:antonym`, `ffv:*`) with an unknown kind, or naming no
    vector (of the model)."""


class VectorTaskMismatch(FFVError, ValueError):
    """The vector= of ffv-patched cannot patch a task's requests: cfv on documents without a
    source pair or on rolling log-likelihoods, <kind>:* on a task that is not relation_<name>."""


@dataclass(frozen=True)
class VectorSpec:
    """One parsed vector= (see the module's docstring for the forms). `kind`: the kind named
    (NAME: None for a bare name; EACH_RELATION: the kind each task gets); `relation`: the
    relation named (NAME); `path`: the file (FILE). str() gives the spec back as vector= takes it."""

    form: str
    kind: str | None = None
    relation: str | None = None
    path: str | None = None

    @classmethod
    def parse(cls, value) -> VectorSpec:
        """A vector= value (a string, a path, None or a VectorSpec); VectorNameError for an
        unknown kind or a name that cannot name a vector."""
        if isinstance(value, VectorSpec):
            return value
        text = "" if value is None else str(value)
        if text in ("", NONE):
            return cls(NONE)
        if text in (AUTO, COMPOSITE):
            return cls(text)
        if text.endswith(":*"):
            return cls(EACH_RELATION, kind=_known_kind(text[:-2], text))
        if text.endswith(VECTOR_SUFFIX) or os.sep in text or Path(text).exists():
            return cls(FILE, path=text)
        kind, _, relation = text.rpartition(":")
        if kind:
            _known_kind(kind, text)
        if not relation or any(c in relation for c in WILDCARDS):
            raise VectorNameError(f"vector={text}: {relation!r} is not a relation name (e.g. antonym, "
                                  f"{kind or AUTO_RELATION_KIND}:antonym, {kind or AUTO_RELATION_KIND}:* or a .safetensors file)")
        return cls(NAME, kind=kind or None, relation=relation)

    def __str__(self) -> str:
        if self.form == FILE:
            return str(self.path)
        if self.form == NAME:
            return f"{self.kind}:{self.relation}" if self.kind else str(self.relation)
        if self.form == EACH_RELATION:
            return f"{self.kind}:*"
        return self.form

    @property
    def is_none(self) -> bool:
        return self.form == NONE

    @property
    def is_auto(self) -> bool:
        return self.form == AUTO

    @property
    def is_composite(self) -> bool:
        return self.form == COMPOSITE

    @property
    def is_file(self) -> bool:
        return self.form == FILE

    @property
    def is_name(self) -> bool:
        return self.form == NAME

    @property
    def names_vectors(self) -> bool:
        """One fixed vector for every task: a file, or a name (one file per model)."""
        return self.form in (NAME, FILE)

    @property
    def per_task(self) -> bool:
        """The vector depends on the task (auto, <kind>:*): see for_task."""
        return self.form in (AUTO, EACH_RELATION)

    @property
    def per_task_kind(self) -> str | None:
        """What results record as the kind of a per-task run: `auto`, or the kind of <kind>:*."""
        return AUTO if self.form == AUTO else self.kind if self.form == EACH_RELATION else None

    @property
    def kinds(self) -> tuple[str, ...]:
        """A name's kinds to look for, in order of preference (a bare name: BARE_NAME_KINDS)."""
        return (self.kind,) if self.kind else BARE_NAME_KINDS

    def for_task(self, task: str, docs_have_source_pair: bool) -> VectorSpec:
        """The vector a task gets: a per-task spec resolved for `task` (auto: a relation_<name>
        task that relation's FFV, else cfv when `docs_have_source_pair`, i.e. every document of
        the task has fields a and b; <kind>:*: a relation_<name> task `<kind>:<name>`); any
        other spec is the same for every task. VectorTaskMismatch when the task has none."""
        if not self.per_task:
            return self
        task = str(task)
        kind = AUTO_RELATION_KIND if self.is_auto else self.kind
        if task.startswith(RELATION_TASK_PREFIX):
            return VectorSpec(NAME, kind=kind, relation=task.removeprefix(RELATION_TASK_PREFIX))
        if not self.is_auto:
            raise VectorTaskMismatch(f"vector={self} patches each {RELATION_TASK_PREFIX}<name> task with that relation's "
                                     f"{kind}; task {task} is not one")
        if docs_have_source_pair:
            return VectorSpec(COMPOSITE)
        raise VectorTaskMismatch(
            f"vector=auto: task {task} has no vector of its own: it is not a {RELATION_TASK_PREFIX}<name> task (those get "
            f"the relation's shipped {AUTO_RELATION_KIND}) and its documents have no source pair a:b (analogy tasks get a "
            f"{COMPOSITE} per question). Vector kinds that fit it: a fixed vector (vector=<name> or "
            f"vector=<file>{VECTOR_SUFFIX}, kinds {', '.join(KINDS)}); vector=none runs it unpatched")


def _known_kind(kind: str, text: str) -> str:
    if kind not in KINDS:
        raise VectorNameError(f"vector={text}: unknown kind '{kind}' (known: {', '.join(KINDS)})")
    return kind
