"""What an ffv-patched run records about its vector: `config.ffv_vector` of lm-eval's results, one
type for the harness that writes it and the leaderboard that reads it. Import-light (no torch):
the reports read it.

A record has one of four shapes, each written with its keys in a fixed order:

    a stored vector     path, sha256 (of the file), patch_layer, patch_scale, then the sidecar's
                        kind, relation, model, model_fingerprint, layer, scale, heads, data,
                        seed, metrics (those it has)
    a composite run     kind `cfv`, path and sha256 of the basis directory, relation null,
                        composition, patch_layer, patch_scale, layer, n_basis, posterior, then
                        the map's model, model_fingerprint, temperature, settings, metrics
    a per-task run      kind (`auto`, or the kind of <kind>:*), relation null, per_task (task ->
                        the record of the vector that task got), path (where those vectors
                        are), patch_scale
    a task's vector in  path, layer (the per_task entries of runs from before the records
    older runs          above; they name no kind)

`from_json` reads any of them (and keeps keys it does not know, after the known ones), so that
`from_json(x).to_json() == x` for every results file the project has written."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

COMPOSITE_KIND = "cfv"
COMPOSITION = "per question, from its source pair"
STORED_KEYS = ("path", "sha256", "patch_layer", "patch_scale", "kind", "relation", "model", "model_fingerprint", "layer",
               "scale", "heads", "data", "seed", "metrics")
STORED_METADATA = STORED_KEYS[4:]  # read off the vector's sidecar
COMPOSITE_KEYS = ("kind", "path", "sha256", "relation", "composition", "patch_layer", "patch_scale", "layer", "n_basis",
                  "posterior", "model", "model_fingerprint", "temperature", "settings", "metrics")
COMPOSITE_METADATA = COMPOSITE_KEYS[10:]  # read off the map's composite.json
PER_TASK_KEYS = ("kind", "relation", "per_task", "path", "patch_scale")
OLD_TASK_KEYS = ("path", "layer")
# The keys each shape writes even when null; the others only when there is a value.
ALWAYS = {STORED_KEYS: STORED_KEYS[:6] + ("layer",), COMPOSITE_KEYS: COMPOSITE_KEYS[:10], PER_TASK_KEYS: PER_TASK_KEYS,
          OLD_TASK_KEYS: OLD_TASK_KEYS}
TYPED = ("kind", "relation", "path", "sha256", "layer", "patch_layer", "scale", "patch_scale", "per_task")


@dataclass(frozen=True)
class VectorInfo:
    """The vector of one task of a run, as the leaderboard shows it (VectorRecord.used_by)."""

    kind: str
    relation: str | None
    path: str | None
    layer: int | None
    patch_layer: int | None
    scale: float | None
    patch_scale: float | None
    sha256: str | None = None  # of the vector file (or basis directory), where the run recorded it
    task_kind: str | None = None  # under a per-task spec (auto, <kind>:*): the kind this task got (ffv, cfv)
    overlap: dict | None = None  # the task's documents against the vector's training pairs (data.overlap.Overlap); None: not recorded

    def overlap_text(self) -> str:
        """'3 of 228 documents', '0 of 228 documents', 'not checked: ...' or 'not recorded'."""
        if not isinstance(self.overlap, dict):
            return "not recorded"
        if self.overlap.get("documents") is None:
            return "not checked" + (f": {self.overlap['unchecked']}" if self.overlap.get("unchecked") else "")
        return f"{self.overlap['documents']} of {self.overlap.get('of')} documents"


@dataclass(frozen=True)
class VectorRecord:
    """`config.ffv_vector` (see the module's docstring). Values are kept as recorded; `details`
    holds every key besides the typed ones, in the order recorded."""

    kind: str | None  # None only in a task's record of an older per-task run
    relation: str | None = None
    path: str | None = None
    sha256: str | None = None
    layer: int | None = None  # the layer the vector was made for
    patch_layer: int | None = None  # the layer it was added after
    scale: float | None = None  # the vector's own scale (an FV's)
    patch_scale: float | None = None  # the scale= of the run
    per_task: dict[str, VectorRecord] | None = None  # a per-task run: each task's own record
    details: dict = field(default_factory=dict)

    # -- the harness's records ---------------------------------------------------------------
    @classmethod
    def stored(cls, path, sha256: str, patch_layer: int, patch_scale: float, metadata: Mapping) -> VectorRecord:
        """A stored vector: its file and hash, where and how strongly it was added, and its
        sidecar's facts (STORED_METADATA, those it has)."""
        meta = {k: metadata[k] for k in STORED_METADATA if k in metadata}
        return cls(kind=meta.get("kind"), relation=meta.get("relation"), path=str(path), sha256=sha256,
                   layer=meta.get("layer"), patch_layer=patch_layer, scale=meta.get("scale"), patch_scale=patch_scale,
                   details={k: v for k, v in meta.items() if k not in TYPED})

    @classmethod
    def composite(cls, directory, sha256: str, layer: int, patch_scale: float, n_basis: int, posterior: str,
                  metadata: Mapping) -> VectorRecord:
        """A composite run: the basis directory and its hash, the map's layer (where the
        vectors are added), basis size and posterior, and its composite.json's facts
        (COMPOSITE_METADATA, those it has)."""
        details = {"composition": COMPOSITION, "n_basis": n_basis, "posterior": posterior,
                   **{k: metadata[k] for k in COMPOSITE_METADATA if k in metadata}}
        return cls(kind=COMPOSITE_KIND, relation=None, path=str(directory), sha256=sha256, layer=layer, patch_layer=layer,
                   patch_scale=patch_scale, details=details)

    @classmethod
    def per_task_run(cls, kind: str, per_task: dict[str, VectorRecord], path: str, patch_scale: float) -> VectorRecord:
        """A per-task run (vector=auto or <kind>:*): each task's record in `per_task`."""
        return cls(kind=kind, relation=None, path=path, patch_scale=patch_scale, per_task=per_task)

    # -- JSON --------------------------------------------------------------------------------
    def _keys(self) -> tuple[str, ...]:
        if self.per_task is not None:
            return PER_TASK_KEYS
        if self.kind == COMPOSITE_KIND:
            return COMPOSITE_KEYS
        return STORED_KEYS if self.kind is not None else OLD_TASK_KEYS

    def to_json(self) -> dict:
        """The record as results hold it: its shape's keys in their order (see the module's
        docstring), then any other keys it was read with."""
        keys = self._keys()
        typed = {name: getattr(self, name) for name in TYPED}
        if self.per_task is not None:
            typed["per_task"] = {task: record.to_json() for task, record in self.per_task.items()}
        out = {}
        for key in keys:
            if key in typed:
                if key in ALWAYS[keys] or typed[key] is not None:
                    out[key] = typed[key]
            elif key in self.details:
                out[key] = self.details[key]
        out.update((k, v) for k, v in typed.items() if v is not None and k not in out)
        out.update((k, v) for k, v in self.details.items() if k not in out)
        return out

    @classmethod
    def from_json(cls, recorded: Mapping) -> VectorRecord:
        """A record as read from results (any of the shapes; per_task entries that are not
        objects are left out)."""
        per_task = recorded.get("per_task")
        if isinstance(per_task, Mapping):
            per_task = {task: cls.from_json(used) for task, used in per_task.items() if isinstance(used, Mapping)}
        else:
            per_task = None
        return cls(kind=recorded.get("kind"), relation=recorded.get("relation"), path=recorded.get("path"),
                   sha256=recorded.get("sha256"), layer=recorded.get("layer"), patch_layer=recorded.get("patch_layer"),
                   scale=recorded.get("scale"), patch_scale=recorded.get("patch_scale"), per_task=per_task,
                   details={k: v for k, v in recorded.items() if k not in TYPED})

    # -- reading ------------------------------------------------------------------------------
    def used_by(self, task: str | None = None) -> VectorInfo:
        """The vector `task` got: under a per-task run, that task's record (its relation, path,
        layer and hash; older records without a kind: the relation of the task's name) with the
        run's kind and scales; otherwise the run's one vector."""
        used = (self.per_task or {}).get(task)
        if used is None:
            sha256 = self.sha256
            overlaps = self.details.get("overlap")
            return VectorInfo(kind=self.kind, relation=self.relation, path=self.path, layer=self.layer,
                              patch_layer=self.patch_layer, scale=self.scale, patch_scale=self.patch_scale,
                              sha256=sha256 if isinstance(sha256, str) else None,
                              overlap=overlaps.get(task) if isinstance(overlaps, dict) else None)
        relation = used.relation if used.kind is not None else str(task).removeprefix("relation_")
        return VectorInfo(kind=self.kind, relation=relation, path=used.path, layer=used.layer, patch_layer=used.layer,
                          scale=self.scale, patch_scale=self.patch_scale,
                          sha256=used.sha256 if isinstance(used.sha256, str) else None,
                          task_kind=used.kind if isinstance(used.kind, str) else None, overlap=used.details.get("overlap"))
