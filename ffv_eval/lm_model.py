"""The lm-eval model type `ffv-patched`: Hugging Face causal LMs (HFLM) with a function vector
added to the residual stream at the last context token of every request, through nnsight.

model_args: pretrained= (an embedded alias such as gemma-3-270m, a hub id or a local path),
vector= (a shipped name such as antonym / fv:antonym, a .safetensors file, `ffv:*` / `fv:*`: each
relation_<name> task with that relation's own shipped vector, or `cfv`: a composite vector built
per question from its source pair A:B), basis= (for cfv: the basis directory,
default $FFV_CACHE_DIR/basis/<model>), layer= (default: the vector's own), scale= (default 1).
Without a vector the scores equal `--model hf`.

Where the vector goes: at the last context token, except in multiple-choice analogy documents
(choices [[C, D], ...]): there it goes where D's first token is predicted, inside the
continuation `Q: C\nA: D`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import stop_sequences_criteria
from tqdm import tqdm

from ffv_eval.model_loading import model_fingerprint, resolve_pretrained, text_config
from ffv_eval.patching import Patcher
from ffv_eval.vector_store import KINDS, StoredVector, VectorFileError, check_compatible, find_vectors

COMPOSITE = "cfv"
PER_TASK = ":*"  # vector=ffv:* -> each relation_<name> task with its own shipped ffv


@register_model("ffv-patched")
class FFVPatchedLM(HFLM):
    def __init__(self, pretrained="gemma-3-270m", vector=None, layer=None, scale=1.0, basis=None, **kwargs):
        # Everything about the vector is checked before the weights are loaded.
        vector = None if vector in (None, "", "none") else str(vector)
        if vector is not None and vector.endswith(PER_TASK) and vector[: -len(PER_TASK)] not in KINDS:
            raise VectorFileError(f"vector={vector}: unknown kind '{vector[: -len(PER_TASK)]}' (known: {', '.join(KINDS)})")
        candidates = find_vectors(vector) if vector not in (None, COMPOSITE) and not vector.endswith(PER_TASK) else []
        if candidates:
            config = text_config(pretrained)
            fits = [c for c in candidates if c.metadata["hidden_size"] == config.hidden_size]
            check_compatible(fits[0] if fits else candidates[0], config.hidden_size, config.num_hidden_layers, None,
                             None if layer is None else int(layer))
        self.model_alias = str(pretrained)
        if kwargs.get("device") in (None, "") and not torch.cuda.is_available():
            kwargs["device"] = "cpu"  # HFLM would default to cuda
        super().__init__(pretrained=resolve_pretrained(pretrained), **kwargs)
        self._split_across_cpu_processes()
        self.patcher = Patcher(self.model)
        self.fingerprint = model_fingerprint(self.model)
        self.stored_vector: StoredVector | None = None
        self.composite = None
        self.patch_layer: int | None = None
        self.patch_vector: torch.Tensor | None = None
        self._plans: dict = {}
        self.per_task_kind: str | None = None
        self.per_task_vectors: dict[str, dict] = {}
        self.patch_scale = float(scale)
        if vector == COMPOSITE:
            self.set_composite(basis, scale)
        elif vector is not None and vector.endswith(PER_TASK):
            self.per_task_kind = vector[: -len(PER_TASK)]
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
        """Use `vector` (a spec string, a StoredVector or a list of candidates) from now on;
        None removes it."""
        self.per_task_kind = None
        self._use_vector(vector, layer, scale)

    def _use_vector(self, vector, layer=None, scale=1.0) -> None:
        self.composite = None
        if vector is None:
            self.stored_vector = self.patch_layer = self.patch_vector = None
            return
        candidates = find_vectors(vector) if isinstance(vector, str) else (vector if isinstance(vector, list) else [vector])
        mine = [c for c in candidates if c.metadata["model_fingerprint"] == self.fingerprint]
        stored = mine[0] if mine else candidates[0]
        a = self.patcher.adapter
        self.patch_layer = check_compatible(stored, a.hidden_size, a.n_layers, self.fingerprint, None if layer is None else int(layer))
        self.stored_vector = stored
        self.patch_vector = (stored.vector * float(scale)).to(self.device, self.model.dtype)
        self.patch_scale = float(scale)
        print(f"[ffv] patching {stored.path} ({stored.metadata['kind']}, {stored.metadata['relation']}) "
              f"after block {self.patch_layer} x{self.patch_scale:g}", flush=True)

    def set_composite(self, basis=None, scale=1.0) -> None:
        """Use composite vectors from the fitted map in `basis` (default: the model's basis
        directory): each request's own CFV, built from its document's source pair A:B."""
        from ffv_eval.basis import default_basis_dir
        from ffv_eval.composite import CompositeVectors, load_composite_map

        directory = Path(basis) if basis else default_basis_dir(self.model_alias)
        cmap = load_composite_map(directory, self.fingerprint)
        self.stored_vector = self.patch_vector = None
        self.composite = CompositeVectors(self.patcher, self.tokenizer, cmap)
        self.patch_layer = cmap.basis.layer
        self.patch_scale = float(scale)
        print(f"[ffv] patching composite vectors from {directory} ({len(cmap.basis.names)} basis relations) "
              f"after block {self.patch_layer} x{self.patch_scale:g}", flush=True)

    def get_model_info(self) -> dict:
        info = {
            "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
            "model_dtype": str(self._model.dtype),
            "model_fingerprint": self.fingerprint,
            "ffv_model": self.model_alias,
        }
        if self.stored_vector is not None:
            meta = self.stored_vector.metadata
            info["ffv_vector"] = {
                "path": str(self.stored_vector.path),
                "patch_layer": self.patch_layer,
                "patch_scale": self.patch_scale,
                **{k: meta[k] for k in ("kind", "relation", "model", "model_fingerprint", "layer", "scale", "heads", "data", "seed", "metrics") if k in meta},
            }
        elif self.composite is not None:
            meta = self.composite.cmap.metadata
            info["ffv_vector"] = {
                "kind": COMPOSITE,
                "path": str(self.composite.cmap.basis.directory),
                "relation": None,
                "composition": "per question, from its source pair",
                "patch_layer": self.patch_layer,
                "patch_scale": self.patch_scale,
                "layer": self.patch_layer,
                "n_basis": len(self.composite.cmap.basis.names),
                **{k: meta[k] for k in ("model", "model_fingerprint", "temperature", "settings", "metrics") if k in meta},
            }
        elif self.per_task_kind is not None:
            info["ffv_vector"] = {"kind": self.per_task_kind, "relation": None, "per_task": self.per_task_vectors,
                                  "path": f"vectors/<model>/{self.per_task_kind}/<relation>.safetensors", "patch_scale": self.patch_scale}
        else:
            info["ffv_vector"] = None
        return info

    # -- per-request plans: which vector, and where -----------------------------------------
    def _request_plan(self, instance, vector: torch.Tensor | None) -> tuple[torch.Tensor | None, str | None]:
        """(vector, answer word): the answer word is D of a multiple-choice analogy document,
        else None (patch at the last context token)."""
        doc, answer = instance.doc if isinstance(instance.doc, dict) else {}, None
        choices = doc.get("choices")
        if isinstance(choices, list) and choices and all(isinstance(c, (list, tuple)) and len(c) == 2 for c in choices):
            answer = str(choices[instance.idx][1])
        return vector, answer

    def _composite_vectors(self, requests) -> list[torch.Tensor]:
        """The CFV of each request, from its document's source pair (a, b)."""
        stems, where = [], {}
        for r in requests:
            doc = r.doc if isinstance(r.doc, dict) else {}
            if not all(isinstance(doc.get(k), str) for k in ("a", "b")):
                raise VectorFileError(f"vector=cfv: task {r.task_name}, document {r.doc_id} has no source pair "
                                      f"(fields 'a' and 'b'); composite vectors need analogy tasks")
            stems.append((doc["a"], doc["b"]))
            where.setdefault(stems[-1], f"task {r.task_name}, document {r.doc_id}")
        self.composite.prepare(stems, where)
        return [self.composite.vector(a, b) * self.patch_scale for a, b in stems]

    def _per_task(self, requests, run) -> list:
        """vector=<kind>:*: each relation_<name> task's requests with that relation's own vector."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.task_name, []).append(i)
        results: list = [None] * len(requests)
        try:
            for task, indices in groups.items():
                if not str(task).startswith("relation_"):
                    raise VectorFileError(f"vector={self.per_task_kind}:* patches each relation_<name> task with that "
                                          f"relation's {self.per_task_kind}; task {task} is not one")
                self._use_vector(f"{self.per_task_kind}:{task.removeprefix('relation_')}", None, self.patch_scale)
                self.per_task_vectors[task] = {"path": str(self.stored_vector.path), "layer": self.patch_layer}
                for i, result in zip(indices, run([requests[i] for i in indices])):
                    results[i] = result
        finally:
            self.stored_vector = self.patch_vector = self.patch_layer = None
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.per_task_kind:
            return self._per_task(requests, lambda group: self._loglikelihood_planned(group, disable_tqdm))
        return self._loglikelihood_planned(requests, disable_tqdm)

    def _loglikelihood_planned(self, requests, disable_tqdm: bool = False):
        vectors = self._composite_vectors(requests) if self.composite is not None else [self.patch_vector] * len(requests)
        self._plans = {tuple(r.args): self._request_plan(r, v) for r, v in zip(requests, vectors)}
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._plans = {}

    def generate_until(self, requests, disable_tqdm: bool = False):
        if self.per_task_kind:
            return self._per_task(requests, lambda group: super(FFVPatchedLM, self).generate_until(group, disable_tqdm=disable_tqdm))
        if self.composite is None:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        # One CFV per source pair: generate each pair's requests with its own vector.
        vectors = self._composite_vectors(requests)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.doc["a"], r.doc["b"]), []).append(i)
        results: list = [None] * len(requests)
        try:
            for indices in tqdm(groups.values(), disable=disable_tqdm or self.rank != 0, desc="Generating with composite vectors"):
                self.patch_vector = vectors[indices[0]].to(self.device, self.model.dtype)
                for i, text in zip(indices, super().generate_until([requests[i] for i in indices], disable_tqdm=True)):
                    results[i] = text
        finally:
            self.patch_vector = None
        return results

    # -- log-likelihood: patched at each row's last context token; only continuation
    # positions are unembedded ------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.backend != "causal":
            raise VectorFileError("ffv-patched supports causal (decoder-only) models")
        by_length = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        batch_size = override_bs or (self.batch_size if self.batch_size != "auto" else 16)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for chunk in by_length.get_batched(n=batch_size):
            rows, conts, spans = [], [], []
            row_vectors, positions = [], []
            for request_str, context, continuation in chunk:
                tokens = (context + continuation)[-(self.max_length + 1):][:-1]
                rows.append(tokens)
                conts.append(continuation)
                spans.append((len(tokens) - len(continuation), len(tokens)))  # positions predicting the continuation
                vector, answer = self._plans.get(tuple(request_str) if request_str else None, (self.patch_vector, None))
                row_vectors.append(vector)
                offset = 0 if answer is None or vector is None else self._answer_offset(request_str, context, continuation, answer)
                positions.append(spans[-1][0] + offset)
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
            ids = ids.to(self.device)
            patch = None
            if any(v is not None for v in row_vectors):
                zero = torch.zeros(self.patcher.adapter.hidden_size)
                patch = torch.stack([zero if v is None else v.detach().float().cpu() for v in row_vectors]).to(self.device, self.model.dtype)
            with torch.no_grad():
                hidden = self.patcher.final_hidden(
                    ids, None, layer=self.patch_layer, vector=patch, positions=torch.tensor(positions)
                )
            for (request_str, _, _), answer in zip(chunk, _continuation_scores(self.patcher.adapter.unembed, hidden, spans, conts)):
                results.append(answer)
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                progress.update(1)
        progress.close()
        return by_length.get_original(results)

    def _answer_offset(self, request_str, context_tokens, continuation_tokens, answer: str) -> int:
        """Index, within the continuation, of the position that predicts the answer word's first
        token (the continuation ends with the answer, e.g. `Q: C\nA: D`)."""
        context, continuation = request_str
        text = continuation.rstrip()
        if not text.endswith(answer):
            raise VectorFileError(f"continuation {continuation!r} does not end with the answer {answer!r}")
        before = self.tok_encode(context + text[: len(text) - len(answer)].rstrip())
        whole = list(context_tokens) + list(continuation_tokens)
        offset = len(before) - len(context_tokens)
        if before != whole[: len(before)] or not 0 <= offset < len(continuation_tokens):
            raise VectorFileError(f"cannot locate the answer {answer!r} in the tokens of {continuation!r}")
        return offset

    # -- generation: patched at the last context token (left padding) of the prefill step --
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.patch_vector is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        kwargs = dict(generation_kwargs)
        temperature = kwargs.pop("temperature", 0.0)
        if kwargs.get("do_sample") is None:
            kwargs["do_sample"] = temperature != 0.0
        if kwargs["do_sample"]:
            kwargs["temperature"] = temperature
        return self.patcher.generate(
            context,
            layer=self.patch_layer,
            vector=self.patch_vector,
            max_length=max_length,
            stopping_criteria=stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0]),
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
            **kwargs,
        )


@torch.no_grad()
def _continuation_scores(unembed, hidden: torch.Tensor, spans, continuations) -> list[tuple[float, bool]]:
    """(sum of log P(continuation), greedy?) per row, unembedding only the continuation
    positions of all rows in one matmul (bit-identical to HFLM's per-position log-softmax)."""
    rows = torch.cat([torch.full((end - start,), i) for i, (start, end) in enumerate(spans)])
    cols = torch.cat([torch.arange(start, end) for start, end in spans])
    logits = unembed(hidden[rows.to(hidden.device), cols.to(hidden.device)]).float()  # [positions, vocab]
    targets = torch.tensor([t for cont in continuations for t in cont], device=logits.device)
    greedy = logits.argmax(-1) == targets
    picked = F.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    lengths = [end - start for start, end in spans]
    return [(float(p.sum()), bool(g.all())) for p, g in zip(picked.split(lengths), greedy.split(lengths))]
