"""The lm-eval model type `ffv-patched`: Hugging Face causal LMs (HFLM) with a function vector
added to the residual stream at the last context token of every request, through nnsight.

model_args: pretrained= (an embedded alias such as gemma-3-270m, a hub id or a local path),
vector= (default `auto`: each relation_<name> task with that relation's shipped FFV and each
analogy question with its own composite vector; `none`: unpatched, equal to `--model hf`; a
shipped name such as antonym / fv:antonym; a .safetensors file; `ffv:*` / `fv:*` /
`ffv-random:*`: each relation_<name> task with that relation's own shipped vector; `cfv`: a
composite vector built per question from its source pair A:B; parsed by vectors.spec),
basis= (for cfv and auto: the basis directory, default the model's own in ./vectors or the
shipped library), layer= (a fixed vector only; default: the vector's own), scale= (default 1),
overlap= (`warn`, the default: every patched test document is checked against the word pairs
its vector was made from, the result recorded and one line printed per task with overlap;
`error`: such a run is refused before any scoring). The results record which vector each task
got and that check (config.ffv_vector, a vectors.record.VectorRecord).
Every HFLM argument works as in `--model hf` (device, dtype, parallelize, batch_size=auto,
softmax_dtype, mixed_precision_dtype, logits_cache, revision, trust_remote_code, ...).

HFLM stays in charge: its own log-likelihood loop (batching, batch-size detection, the
one-token-continuation logits cache, softmax dtype), rolling log-likelihood and generation run
unchanged, and the vector enters through the two calls they make into the model:

- `_model_call` (log-likelihood): before HFLM's loop runs, each request's padded row of tokens
  and its patch position are planned; each row HFLM passes in is looked up and patched at its
  own position. With a vector only the positions HFLM reads are unembedded (`logits_to_keep`);
  without one HFLM's own call runs, so the scores equal `--model hf` bit for bit.
- `_model_generate`: HFLM's own generation (autocast, stopping criteria, sampling), with the
  vector added once, at the last prompt token of the prefill step.

Where the vector goes: at the last context token, except in multiple-choice analogy documents
(choices [[C, D], ...]): there it goes where D's first token is predicted, inside the
continuation `Q: C\nA: D`.

With `--use_cache`, lm-eval's CachingLM keys responses on the request text only; a patched run
keeps its responses in its own table of the cache file, named after everything that decides
them (model, vector contents, kind, layer, scale, CFV map and basis), so patched, unpatched and
differently patched runs never reuse each other's answers."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from dataclasses import dataclass

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ffv_eval import DEFAULT_MODEL
from ffv_eval.data.overlap import Overlap, PairScreen
from ffv_eval.data.test_sets import document_pairs
from ffv_eval.errors import FFVError, SettingError, TokenizationError
from ffv_eval.files.hashes import vector_sha256
from ffv_eval.models.architectures import UnsupportedArchitecture
from ffv_eval.models.loading import default_device, model_fingerprint, resolve_pretrained, text_config
from ffv_eval.models.patching import Patcher, last_prompt_positions
from ffv_eval.models.tokens import without_right_padding
from ffv_eval.progress import show_progress
from ffv_eval.vectors.library import basis_training_pairs, sidecar_training_pairs, vector_pattern
from ffv_eval.vectors.record import VectorRecord
from ffv_eval.vectors.spec import AUTO, VectorSpec, VectorTaskMismatch
from ffv_eval.vectors.store import StoredVector, check_compatible, find_vectors, sidecar_path

CONFIG_ARGS = ("revision", "subfolder", "trust_remote_code", "gguf_file", "token")  # how HFLM finds the config
HFLM_PAD_ID = 0  # HFLM pads its log-likelihood rows on the right with token 0
OVERLAP_MODES = ("warn", "error")  # overlap=: record and warn (the default), or refuse the run


class OverlapError(FFVError, ValueError):
    """overlap=error: test documents share word pairs with the training data of their vector."""


@dataclass
class RowPlan:
    """How to run one padded row of HFLM's log-likelihood batches: the vector (None: unpatched)
    and the row position it is added at; the shortest row length and the longest continuation
    among the requests that share the row (they bound the positions HFLM reads)."""

    vector: torch.Tensor | None
    position: int
    length: int
    continuation: int

    @property
    def identity(self):
        return None if self.vector is None else (id(self.vector), self.position)


@register_model("ffv-patched")
class FFVPatchedLM(HFLM):
    def __init__(self, pretrained=DEFAULT_MODEL, vector=AUTO, layer=None, scale=1.0, basis=None, overlap="warn", **kwargs):
        # Everything about the vector is checked before the weights are loaded.
        if overlap not in OVERLAP_MODES:
            raise SettingError(f"overlap={overlap}: expected {' or '.join(OVERLAP_MODES)} (warn records and reports test documents "
                               f"that share word pairs with the vector's training data; error refuses the run)")
        self.overlap_mode = overlap
        spec = VectorSpec.parse(vector)
        candidates = find_vectors(spec) if spec.names_vectors else []
        if candidates:
            if isinstance(pretrained, str):
                config = text_config(pretrained, **{k: kwargs[k] for k in CONFIG_ARGS if kwargs.get(k) not in (None, "")})
            else:  # an already loaded transformers model
                config = pretrained.config.get_text_config() if hasattr(pretrained.config, "get_text_config") else pretrained.config
            fits = [c for c in candidates if c.metadata["hidden_size"] == config.hidden_size]
            check_compatible(fits[0] if fits else candidates[0], config.hidden_size, config.num_hidden_layers, None,
                             None if layer is None else int(layer))
        self.model_alias = str(pretrained) if isinstance(pretrained, str) else getattr(pretrained, "name_or_path", "model")
        if kwargs.get("device") in (None, ""):
            kwargs["device"] = default_device()  # HFLM would default to cuda
        super().__init__(pretrained=resolve_pretrained(pretrained) if isinstance(pretrained, str) else pretrained, **kwargs)
        self._split_across_cpu_processes()
        self.patcher = Patcher(self.model)
        self.fingerprint = model_fingerprint(self.model)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.stored_vector: StoredVector | None = None
        self.composite = None
        self.patch_layer: int | None = None
        self.patch_vector: torch.Tensor | None = None
        self._pending: list | None = None  # (vector, answer word) per request of the next _loglikelihood_tokens
        self._rows: dict[tuple, RowPlan] | None = None  # the rows of the HFLM loop now running
        self._prompt_vectors: dict[tuple, torch.Tensor] | None = None  # generation with CFVs: each prompt's vector
        self._cache_table: str | None = None  # lm-eval's own table in a --use_cache file
        self.per_task: VectorSpec | None = None  # vector=auto or <kind>:*: each task's vector from spec.for_task
        self.per_task_vectors: dict[str, VectorRecord] = {}
        self.patch_scale = float(scale)
        self.basis_dir = basis
        self.overlaps: dict[str, Overlap] = {}  # a fixed vector or cfv: per task, its documents' overlap
        self._screens: dict[str, PairScreen | None] = {}  # per vector file or basis directory: its training pairs
        self._task_map = None  # vector=auto: the model's composite map, loaded when a task needs it
        if spec.is_composite:
            self.set_composite(basis, scale)
        elif spec.per_task:
            self.per_task = spec
        elif candidates:
            self.set_vector(candidates, layer, scale)

    def _split_across_cpu_processes(self) -> None:
        """Under `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N` on CPUs,
        HFLM keeps the accelerator but counts only GPUs when it splits the work, so every process
        would score everything. Each process takes its rank, so lm-eval splits the requests and
        gathers the results."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1 and accelerator.device.type == "cpu":
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    # -- the vector --------------------------------------------------------------------------
    def set_vector(self, vector, layer=None, scale=1.0) -> None:
        """Use `vector` (a spec that names vectors, as a string or a VectorSpec, a StoredVector or
        a list of candidates) from now on; None removes it."""
        self.per_task = None
        self._use_vector(vector, layer, scale)
        self._separate_cache()

    def _use_vector(self, vector, layer=None, scale=1.0) -> None:
        self.composite = None
        if vector is None:
            self.stored_vector = self.patch_layer = self.patch_vector = None
            return
        candidates = find_vectors(vector) if isinstance(vector, (str, VectorSpec)) else (vector if isinstance(vector, list) else [vector])
        mine = [c for c in candidates if c.metadata["model_fingerprint"] == self.fingerprint]
        stored = mine[0] if mine else candidates[0]
        a = self.patcher.adapter
        self.patch_layer = check_compatible(stored, a.hidden_size, a.n_layers, self.fingerprint, None if layer is None else int(layer))
        self.stored_vector = stored
        # Kept in float32 on the model's input device; Patcher casts it to the dtype of the
        # hidden state it is added to, on that state's device.
        self.patch_vector = stored.vector.to(self.device, torch.float32) * float(scale)
        self.patch_scale = float(scale)
        show_progress(f"[ffv] patching {stored.path} ({stored.metadata['kind']}, {stored.metadata['relation']}) "
                      f"after block {self.patch_layer} x{self.patch_scale:g}")

    def set_composite(self, basis=None, scale=1.0) -> None:
        """Use composite vectors from the fitted map in `basis` (default: the model's basis
        directory): each request's own CFV, built from its document's source pair A:B."""
        from ffv_eval.vectors.composite import CompositeVectors, model_composite_map

        self.per_task = None
        self.patch_scale = float(scale)
        self._use_composite(CompositeVectors(self.patcher, self.tokenizer, model_composite_map(self.model_alias, self.fingerprint, basis)))
        self._separate_cache()

    def _use_composite(self, composite) -> None:
        self.stored_vector = self.patch_vector = None
        self.composite = composite
        self.patch_layer = composite.cmap.basis.layer
        show_progress(f"[ffv] patching composite vectors from {composite.cmap.basis.directory} ({len(composite.cmap.basis.names)} "
                      f"basis relations, {composite.cmap.posterior_kind} posterior) after block {self.patch_layer} x{self.patch_scale:g}")

    def get_model_info(self) -> dict:
        info = {
            "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
            "model_dtype": str(self._model.dtype),
            "model_fingerprint": self.fingerprint,
            "ffv_model": self.model_alias,
        }
        if self.per_task is not None:
            kind = self.per_task.per_task_kind
            where = "per task" if self.per_task.is_auto else vector_pattern(kind)
            record = VectorRecord.per_task_run(kind, self.per_task_vectors, where, self.patch_scale)
        else:
            record = self._vector_record()
            if record is not None and self.overlaps:
                record = _with_detail(record, "overlap", {task: o.to_json() for task, o in self.overlaps.items()})
        info["ffv_vector"] = None if record is None else record.to_json()
        return info

    def _vector_record(self) -> VectorRecord | None:
        """What the results say about the vector in use (None: unpatched)."""
        if self.stored_vector is not None:
            path = self.stored_vector.path
            return VectorRecord.stored(path, vector_sha256(path), self.patch_layer, self.patch_scale, self.stored_vector.metadata)
        if self.composite is not None:
            cmap = self.composite.cmap
            return VectorRecord.composite(cmap.basis.directory, vector_sha256(cmap.basis.directory), self.patch_layer,
                                          self.patch_scale, len(cmap.basis.names), cmap.posterior_kind, cmap.metadata)
        return None

    # -- test documents against the vector's training pairs ----------------------------------
    def _training_screen(self) -> tuple[PairScreen | None, str]:
        """The training pairs of the vector in use (None: its files predate recorded pairs) and
        its file or basis directory. For a CFV: every basis relation's pairs and the pairs the
        map's training analogies came from."""
        if self.stored_vector is not None:
            where = str(self.stored_vector.path)
            if where not in self._screens:
                pairs = sidecar_training_pairs(self.stored_vector.metadata, sidecar_path(self.stored_vector.path))
                self._screens[where] = None if pairs is None else PairScreen(pairs)
        else:
            where = str(self.composite.cmap.basis.directory)
            if where not in self._screens:
                found = basis_training_pairs(self.composite.cmap.basis.directory)
                self._screens[where] = None if found is None else PairScreen(
                    pair for by_relation in found.values() for pairs in by_relation.values() for pair in pairs)
        return self._screens[where], where

    def _task_overlap(self, task: str, requests) -> Overlap:
        """The overlap of one task's documents (each once) with the training pairs of the vector in use."""
        docs = list({r.doc_id: r.doc for r in requests}.values())
        screen, where = self._training_screen()
        if screen is None:
            return Overlap.not_checked(len(docs), f"{where} records no training pairs (made before ffv-eval recorded them; "
                                                  f"rebuild it to check it)")
        overlap = Overlap()
        for doc in docs:
            overlap.count(screen, document_pairs(doc) if isinstance(doc, dict) else [])
        return overlap

    def _report_overlap(self, found: dict[str, Overlap]) -> None:
        """One line per task with overlap; under overlap=error, a refusal naming the pairs (before any scoring)."""
        bad = {task: o for task, o in found.items() if o.found}
        for task, o in bad.items():
            show_progress(f"[ffv] overlap: {task}: {o.summary()} share word pairs with the training data of its vector"
                          if o.documents is not None else f"[ffv] overlap: {task}: {o.summary()}")
        if bad and self.overlap_mode == "error":
            raise OverlapError("overlap=error: " + "; ".join(f"{task}: {o.summary()}" for task, o in bad.items())
                                  + ". Use vectors trained without these pairs (ffv basis build / ffv train screen test sets), "
                                  "or overlap=warn to record it and run anyway")

    def _check_fixed(self, requests) -> None:
        """A fixed vector or cfv: every task of this call checked, recorded, reported."""
        if self.stored_vector is None and self.composite is None:
            return
        groups: dict[str, list] = {}
        for r in requests:
            groups.setdefault(r.task_name, []).append(r)
        found = {task: self._task_overlap(task, group) for task, group in groups.items()}
        self.overlaps.update(found)
        self._report_overlap(found)

    # -- lm-eval's response cache (--use_cache) ---------------------------------------------
    def set_cache_hook(self, cache_hook) -> None:
        """lm-eval's CachingLM hands every model a hook whose `dbdict` is the very SqliteDict it
        looks responses up in, keyed on the request text alone. A patched run moves that dict
        to its own table (see `_separate_cache`)."""
        super().set_cache_hook(cache_hook)
        self._cache_table = getattr(getattr(cache_hook, "dbdict", None), "tablename", None)
        self._separate_cache()

    def _separate_cache(self) -> None:
        """Point the response cache (if any) at the table of the current vector: lm-eval's own
        table unpatched (the same responses as `--model hf`), else one named after
        `_vector_identity`. `<kind>:*` runs are not reused: two relation tasks may ask the same
        question, and the cache could not tell their vectors apart; their table is emptied."""
        db = getattr(self.cache_hook, "dbdict", None)
        if db is None or self._cache_table is None:
            return
        identity = self._vector_identity()
        table = self._cache_table if identity is None else "ffv-patched " + hashlib.sha256(identity.encode()).hexdigest()[:24]
        if db.tablename != table:
            from sqlitedict import SqliteDict

            SqliteDict(db.filename, tablename=table, autocommit=True).close()  # creates the table
            db.tablename = table
        if self.per_task is not None:
            db.clear()

    def _vector_identity(self) -> str | None:
        """Everything besides the request that decides a response; None when unpatched."""
        if self.per_task is not None:
            return f"{self.fingerprint} per-task {self.per_task.per_task_kind}:* x{self.patch_scale!r}"
        if self.stored_vector is not None:
            meta = self.stored_vector.metadata
            return (f"{self.fingerprint} {meta['kind']}:{meta['relation']} layer {self.patch_layer} x{self.patch_scale!r} "
                    f"{_digest(self.stored_vector.vector)}")
        if self.composite is not None:
            cmap = self.composite.cmap
            baseline = () if cmap.relation_baseline is None else (cmap.relation_baseline,)
            return (f"{self.fingerprint} cfv layer {self.patch_layer} x{self.patch_scale!r} {cmap.posterior_kind} T {cmap.temperature!r} "
                    f"top_k {cmap.top_k} no_relation {cmap.no_relation!r} {' '.join(cmap.basis.names)} "
                    f"{_digest(cmap.weight, cmap.bias, cmap.basis.vectors, *baseline)}")
        return None

    # -- per-request plans: which vector, and where -----------------------------------------
    def _request_plan(self, instance, vector: torch.Tensor | None) -> tuple[torch.Tensor | None, str | None]:
        """(vector, answer word): the answer word is D of a multiple-choice analogy document,
        else None (patch at the last context token). An analogy document's requests past its
        choices score each choice's C part alone (`Q: C\nA:`, for acc_d): the vector would go
        after their last token, where it changes none of their scores, so they run unpatched."""
        doc, answer = instance.doc if isinstance(instance.doc, dict) else {}, None
        choices = doc.get("choices")
        if isinstance(choices, list) and choices and all(isinstance(c, (list, tuple)) and len(c) == 2 for c in choices):
            if instance.idx >= len(choices):
                return None, None
            answer = str(choices[instance.idx][1])
        return vector, answer

    def _composite_vectors(self, requests) -> list[torch.Tensor]:
        """The CFV of each request, from its document's source pair (a, b): one tensor per pair."""
        stems, where = [], {}
        for r in requests:
            doc = r.doc if isinstance(r.doc, dict) else {}
            if not all(isinstance(doc.get(k), str) for k in ("a", "b")):
                raise VectorTaskMismatch(f"vector=cfv: task {r.task_name}, document {r.doc_id} has no source pair "
                                         f"(fields 'a' and 'b'); composite vectors need analogy tasks")
            stems.append((doc["a"], doc["b"]))
            where.setdefault(stems[-1], f"task {r.task_name}, document {r.doc_id}")
        self.composite.prepare(stems, where)
        vectors = {stem: self.composite.vector(*stem) * self.patch_scale for stem in where}
        return [vectors[stem] for stem in stems]

    def _per_task(self, requests, run) -> list:
        """vector=<kind>:* or auto: each task's requests with the vector the spec gives that task
        (VectorSpec.for_task; every task checked before any runs); the results record each
        task's vector."""
        from ffv_eval.vectors.composite import CompositeVectors, model_composite_map

        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.task_name, []).append(i)
        specs = {task: self.per_task.for_task(task, _have_source_pairs([requests[i] for i in indices]))
                 for task, indices in groups.items()}
        results: list = [None] * len(requests)
        states, found = {}, {}
        try:
            for task, indices in groups.items():  # every task's vector loaded and checked before any runs
                if specs[task].is_composite:
                    if self._task_map is None:
                        self._task_map = CompositeVectors(self.patcher, self.tokenizer,
                                                          model_composite_map(self.model_alias, self.fingerprint, self.basis_dir))
                    self._use_composite(self._task_map)
                else:
                    self._use_vector(specs[task], None, self.patch_scale)
                found[task] = self._task_overlap(task, [requests[i] for i in indices])
                self.per_task_vectors[task] = _with_detail(self._vector_record(), "overlap", found[task].to_json())
                states[task] = (self.stored_vector, self.patch_vector, self.patch_layer, self.composite)
            self._report_overlap(found)
            for task, indices in groups.items():
                self.stored_vector, self.patch_vector, self.patch_layer, self.composite = states[task]
                for i, result in zip(indices, run([requests[i] for i in indices])):
                    results[i] = result
        finally:
            self.stored_vector = self.patch_vector = self.patch_layer = self.composite = None
        return results

    # -- the three request types: HFLM's own, with the vector planned per request ------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.per_task is not None:
            return self._per_task(requests, lambda group: self._loglikelihood_planned(group, disable_tqdm))
        self._check_fixed(requests)
        return self._loglikelihood_planned(requests, disable_tqdm)

    def _loglikelihood_planned(self, requests, disable_tqdm: bool = False):
        vectors = self._composite_vectors(requests) if self.composite is not None else [self.patch_vector] * len(requests)
        # HFLM's loglikelihood encodes the requests in order and hands them, in that order, to
        # _loglikelihood_tokens, which picks these plans up.
        self._pending = [self._request_plan(r, v) for r, v in zip(requests, vectors)]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._pending = None

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """HFLM's rolling windows; a fixed vector is added at each window's last context token."""
        if self.per_task is not None:
            return self._per_task(requests, lambda group: self._rolling_planned(group, disable_tqdm))
        self._check_fixed(requests)
        return self._rolling_planned(requests, disable_tqdm)

    def _rolling_planned(self, requests, disable_tqdm: bool = False):
        if self.composite is not None:
            raise VectorTaskMismatch("vector=cfv builds each question's vector from its document's source pair; "
                                     "loglikelihood_rolling tasks (perplexity) have none: use a fixed vector")
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        if self.per_task is not None:
            return self._per_task(requests, lambda group: self._generate_planned(group, disable_tqdm))
        self._check_fixed(requests)
        return self._generate_planned(requests, disable_tqdm)

    def _generate_planned(self, requests, disable_tqdm: bool = False):
        if self.composite is None:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        # Each request's own CFV in HFLM's batches: every row of a batch gets the vector of its
        # prompt (found by the prompt's tokens, as HFLM encodes it). Prompts alike but patched
        # differently go to later rounds, each through HFLM's loop on its own; usually one round.
        vectors = self._composite_vectors(requests)
        rounds: list[tuple[dict[tuple, torch.Tensor], list[int]]] = []
        for i, (request, vector) in enumerate(zip(requests, vectors)):
            key = tuple(self.tok_batch_encode([request.args[0]])[0][0].tolist())
            for plans, indices in rounds:  # noqa: B007 (the matching round's indices are appended to below)
                if plans.get(key, vector) is vector:
                    break
            else:
                plans, indices = {}, []
                rounds.append((plans, indices))
            plans[key] = vector
            indices.append(i)
        results: list = [None] * len(requests)
        try:
            for plans, indices in rounds:
                self._prompt_vectors = plans
                for i, text in zip(indices, super().generate_until([requests[i] for i in indices], disable_tqdm=disable_tqdm)):
                    results[i] = text
        finally:
            self._prompt_vectors = None
        return results

    # -- log-likelihood: HFLM's loop; each row patched at its own position ------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        pending, self._pending = self._pending, None
        if pending is None:  # rolling windows, or a direct call: the fixed vector at the last context token
            if self.composite is not None:
                raise VectorTaskMismatch("vector=cfv needs each request's document (its source pair); call loglikelihood")
            pending = [(self.patch_vector, None)] * len(requests)
        if len(pending) != len(requests):
            raise RuntimeError(f"ffv-patched: {len(pending)} request plans for {len(requests)} requests")
        if all(vector is None for vector, _ in pending):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        if self.backend != "causal":
            raise UnsupportedArchitecture("ffv-patched supports causal (decoder-only) models")
        results: list = [None] * len(requests)
        try:
            for rows, indices in self._plan_rows(requests, pending):
                self._rows = rows
                scores = super()._loglikelihood_tokens([requests[i] for i in indices], disable_tqdm=disable_tqdm,
                                                       override_bs=override_bs)
                for i, score in zip(indices, scores):
                    results[i] = score
        finally:
            self._rows = None
        return results

    def _plan_rows(self, requests, pending) -> list[tuple[dict[tuple, RowPlan], list[int]]]:
        """The row HFLM will build for each request ((context + continuation) truncated to
        max_length, without its last token), keyed by its tokens without trailing zeros (HFLM pads
        right with zeros), and its plan. Requests whose rows look alike but must be patched
        differently (HFLM would run them as one row: its one-token-continuation cache, or the
        same tokens split differently into context and continuation) go to later rounds, each
        run through HFLM's loop on its own; usually there is one round."""
        rounds: list[tuple[dict[tuple, RowPlan], list[int]]] = []
        for i, ((request_str, context, continuation), (vector, answer)) in enumerate(zip(requests, pending)):
            row = (context + continuation)[-(self.max_length + 1):][:-1]
            position = len(row) - len(continuation)  # the last context token
            if answer is not None and vector is not None:
                position += self._answer_offset(request_str, context, continuation, answer)
            plan = RowPlan(vector, position, len(row), len(continuation))
            key = without_right_padding(row, HFLM_PAD_ID)
            for rows, indices in rounds:  # noqa: B007 (the matching round's indices are appended to below)
                if key not in rows or rows[key].identity == plan.identity:
                    break
            else:
                rows, indices = {}, []
                rounds.append((rows, indices))
            if key in rows:
                known = rows[key]
                plan.length, plan.continuation = min(known.length, plan.length), max(known.continuation, plan.continuation)
            rows[key] = plan
            indices.append(i)
        return rounds

    def _answer_offset(self, request_str, context_tokens, continuation_tokens, answer: str) -> int:
        """Index, within the continuation, of the position that predicts the answer word's first
        token (the continuation ends with the answer, e.g. `Q: C\nA: D`)."""
        context, continuation = request_str
        text = continuation.rstrip()
        if not text.endswith(answer):
            raise TokenizationError(f"continuation {continuation!r} does not end with the answer {answer!r}")
        before = self.tok_encode(context + text[: len(text) - len(answer)].rstrip())
        whole = list(context_tokens) + list(continuation_tokens)
        offset = len(before) - len(context_tokens)
        if before != whole[: len(before)] or not 0 <= offset < len(continuation_tokens):
            raise TokenizationError(f"cannot locate the answer {answer!r} in the tokens of {continuation!r}")
        return offset

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """HFLM's forward for a right-padded batch of rows; with a vector, each row patched at its
        planned position, and logits returned for the last positions only, as many as HFLM reads
        (it locates the continuation from the end of the returned logits)."""
        rows = self._rows
        if rows is None or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        plans = [rows.get(without_right_padding(row, HFLM_PAD_ID)) for row in inps.tolist()]
        if all(plan is None for plan in plans):  # HFLM's batch-size probe (batch_size=auto)
            return super()._model_call(inps)
        if any(plan is None for plan in plans):
            raise RuntimeError("ffv-patched: HFLM built a log-likelihood row that was not planned")
        width = inps.shape[1]
        keep = min(width, max(width - plan.length + plan.continuation for plan in plans))
        # float32 on the input device; Patcher casts to the hidden state's dtype where it adds.
        vectors = torch.stack([
            torch.zeros(self.patcher.adapter.hidden_size, device=inps.device) if plan.vector is None
            else plan.vector.to(inps.device, torch.float32) for plan in plans
        ])
        positions = torch.tensor([plan.position for plan in plans], dtype=torch.long, device=inps.device)

        def forward(ids):
            if self._keeps_logits:
                # Positions as a tensor: transformers then gathers a contiguous copy of the hidden
                # states; an int slices a strided view, which torch 2.13's CPU matmul with frozen
                # weights takes a path up to 10x slower on (same logits either way).
                return self.model(ids, logits_to_keep=torch.arange(width - keep, width, device=ids.device)).logits
            return self.model(ids).logits[:, width - keep:]

        mixed = self.mixed_precision_dtype
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=mixed, enabled=mixed is not None):  # as HFLM
            return self.patcher.call_with_vector(forward, inps, layer=self.patch_layer, vector=vectors, positions=positions)

    # -- generation: HFLM's own, patched at the last prompt token of the prefill step --------
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        vector = self.patch_vector
        if self._prompt_vectors is not None:  # composite vectors: each row its prompt's own
            mask = generation_kwargs.get("attention_mask")
            rows = context.tolist() if mask is None else [
                [t for t, keep in zip(row, row_mask) if keep] for row, row_mask in zip(context.tolist(), mask.tolist())]
            if any(tuple(row) not in self._prompt_vectors for row in rows):
                raise RuntimeError("ffv-patched: HFLM built a generation prompt that was not planned (truncated?)")
            vector = torch.stack([self._prompt_vectors[tuple(row)].to(context.device, torch.float32) for row in rows])
        if vector is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        generate = super()._model_generate
        return self.patcher.call_with_vector(lambda ids, **kwargs: generate(ids, max_length, stop, **kwargs), context,
                                             layer=self.patch_layer, vector=vector,
                                             positions=last_prompt_positions(context), **generation_kwargs)


def _with_detail(record: VectorRecord, key: str, value) -> VectorRecord:
    """The record with one more entry (after its own) in the results' JSON."""
    return dataclasses.replace(record, details={**record.details, key: value})


def _have_source_pairs(requests) -> bool:
    """Every request's document has a source pair a:b (fields `a` and `b`): an analogy task's."""
    return all(isinstance(r.doc, dict) and all(isinstance(r.doc.get(k), str) for k in ("a", "b")) for r in requests)


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        # float32 bytes on the CPU: the same digest for the same values on any device
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]
