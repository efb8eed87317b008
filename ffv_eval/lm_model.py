"""The lm-eval model type `ffv-patched`: Hugging Face causal LMs (HFLM) with a function vector
added to the residual stream at the last context token of every request, through nnsight.

model_args: pretrained= (an embedded alias such as gemma-3-270m, a hub id or a local path),
vector= (a shipped name such as antonym / fv:antonym, or a .safetensors file), layer= (default:
the vector's own), scale= (default 1). Without a vector the scores equal `--model hf`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import stop_sequences_criteria
from tqdm import tqdm

from ffv_eval.model_loading import model_fingerprint, resolve_pretrained, text_config
from ffv_eval.patching import Patcher
from ffv_eval.vector_store import StoredVector, VectorFileError, check_compatible, find_vectors


@register_model("ffv-patched")
class FFVPatchedLM(HFLM):
    def __init__(self, pretrained="gemma-3-270m", vector=None, layer=None, scale=1.0, **kwargs):
        # Everything about the vector is checked before the weights are loaded.
        candidates = find_vectors(str(vector)) if vector not in (None, "", "none") else []
        if candidates:
            config = text_config(pretrained)
            fits = [c for c in candidates if c.metadata["hidden_size"] == config.hidden_size]
            check_compatible(fits[0] if fits else candidates[0], config.hidden_size, config.num_hidden_layers, None,
                             None if layer is None else int(layer))
        self.model_alias = str(pretrained)
        if kwargs.get("device") in (None, "") and not torch.cuda.is_available():
            kwargs["device"] = "cpu"  # HFLM would default to cuda
        super().__init__(pretrained=resolve_pretrained(pretrained), **kwargs)
        self.patcher = Patcher(self.model)
        self.fingerprint = model_fingerprint(self.model)
        self.stored_vector: StoredVector | None = None
        self.patch_layer: int | None = None
        self.patch_vector: torch.Tensor | None = None
        if candidates:
            self.set_vector(candidates, layer, scale)

    # -- the vector --------------------------------------------------------------------------
    def set_vector(self, vector, layer=None, scale=1.0) -> None:
        """Use `vector` (a spec string, a StoredVector or a list of candidates) from now on;
        None removes it."""
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
        else:
            info["ffv_vector"] = None
        return info

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
            for _, context, continuation in chunk:
                tokens = (context + continuation)[-(self.max_length + 1):][:-1]
                rows.append(tokens)
                conts.append(continuation)
                spans.append((len(tokens) - len(continuation), len(tokens)))  # positions predicting the continuation
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
            ids = ids.to(self.device)
            last_context = torch.tensor([start for start, _ in spans])
            with torch.no_grad():
                hidden = self.patcher.final_hidden(
                    ids, None, layer=self.patch_layer, vector=self.patch_vector, positions=last_context
                )
                for (request_str, _, _), cont, (start, end), h in zip(chunk, conts, spans, hidden):
                    logprobs = F.log_softmax(self.patcher.adapter.unembed(h[start:end]).float(), dim=-1)
                    target = torch.tensor(cont, device=logprobs.device)
                    answer = (float(logprobs[torch.arange(len(cont)), target].sum()), bool((logprobs.argmax(-1) == target).all()))
                    results.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    progress.update(1)
        progress.close()
        return by_length.get_original(results)

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
