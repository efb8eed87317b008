"""Interventions on a causal LM through nnsight: add a vector to the residual stream at chosen
positions, read per-head attention outputs, and overwrite single heads' outputs. Every edit
goes through the architecture adapter's module paths, per head through a [B, S, H, D] view of
the attention output projection's input (the concatenated heads in every supported family),
and every tensor put into the model is first moved to the device and dtype it meets there.

nnsight 0.8 runs the intervention body interleaved with the real forward pass: modules must be
visited in execution order, and results are collected in lists made before the trace."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager

import nnsight
import torch
from nnsight import NNsight

from ffv_eval.models.architectures import ArchitectureAdapter, adapter_for


class Patcher:
    """One wrapped model, the interventions ffv_eval needs on it."""

    def __init__(self, model: torch.nn.Module, adapter: ArchitectureAdapter | None = None):
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.traced = NNsight(model)

    def _layer(self, layer: int):
        return self.adapter.decoder_layers(self.traced)[layer]

    def _o_proj(self, layer: int):
        return self.adapter.o_proj(layer, self.traced)

    # -- adding a vector to the residual stream -------------------------------------------
    def _add_at(self, layer: int, vector: torch.Tensor, positions: torch.Tensor) -> None:
        """Inside a trace: residual[b, positions[b]] += vector[b] after decoder block `layer`."""
        hidden = _tensor(self._layer(layer).output)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        hidden[rows, positions.to(hidden.device)] += vector.to(hidden.device, hidden.dtype)

    def final_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        layer: int | None = None,
        vector: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        **forward_kwargs,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, S, hidden] (no unembedding), optionally with
        `vector` ([hidden] or [B, hidden]) added after block `layer` at `positions` [B].
        forward_kwargs go to the model (e.g. past_key_values)."""
        base = self.adapter.base_model()
        if vector is None:
            return base(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).last_hidden_state
        return self.call_with_vector(base.forward, input_ids, layer=layer, vector=vector, positions=positions,
                                     attention_mask=attention_mask, **forward_kwargs).last_hidden_state

    def final_hidden_per_vector(self, input_ids: torch.Tensor, past_key_values, *, layer: int, vectors: torch.Tensor,
                                positions: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B * V, S, hidden] of input_ids [B, S] after a key/value
        cache of B rows, each row under each of its V vectors (vectors [B * V, hidden], a row's V
        together) added after block `layer` at positions[b]: what final_hidden gives on the rows
        repeated V times with the cache repeated so, but blocks 0..layer run once per row (no
        vector reaches them) and only the later blocks once per (row, vector). The blocks up to
        `layer` are stood in for while the later ones run (no trace: plain forwards, their
        results passed through). The cache is consumed."""
        blocks = self.adapter.decoder_layers()
        n = vectors.shape[0] // input_ids.shape[0]
        repeated = copy.deepcopy(past_key_values)  # the later blocks' cache, before the shared pass appends to it
        repeated.batch_repeat_interleave(n)
        base = self.adapter.base_model()
        captured: list[torch.Tensor] = []
        original = blocks[layer].forward

        def keep(hidden, *args, **kwargs):
            return hidden

        def capture(*args, **kwargs):
            captured.append(_tensor(original(*args, **kwargs)))
            return captured[-1]

        with _standing_in(blocks, {**{i: keep for i in range(layer + 1, len(blocks))}, layer: capture}):
            base(input_ids=input_ids, past_key_values=past_key_values, use_cache=True)  # blocks 0..layer, once per row

        def patched(*args, **kwargs):
            hidden = captured[0].repeat_interleave(n, 0)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            hidden[rows, positions.repeat_interleave(n).to(hidden.device)] += vectors.to(hidden.device, hidden.dtype)
            return hidden

        with _standing_in(blocks, {**{i: keep for i in range(layer)}, layer: patched}):
            return base(input_ids=input_ids.repeat_interleave(n, 0), past_key_values=repeated, use_cache=True).last_hidden_state

    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        layer: int | None = None,
        vector: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """`model.generate` on left-padded inputs, with `vector` added after block `layer` at
        the last prompt position of the first (prefill) step only."""
        if vector is None:
            return self.model.generate(input_ids=input_ids, **generate_kwargs)
        return self.call_with_vector(self.model.generate, input_ids, layer=layer, vector=vector,
                                     positions=last_prompt_positions(input_ids), **generate_kwargs)

    def call_with_vector(self, fn, input_ids: torch.Tensor, *, layer: int, vector: torch.Tensor,
                         positions: torch.Tensor, **kwargs):
        """fn(input_ids, **kwargs), for any callable that runs the model (its forward, its
        `generate`, or a caller of them such as lm-eval's HFLM methods), with `vector` ([hidden]
        or [B, hidden]) added after block `layer` at `positions` [B] in the first forward pass
        only (in a generation: the prefill step). Returns what fn returns."""
        out: list = []
        with self.traced.trace(input_ids, fn=fn, **kwargs) as tracer:
            self._add_at(layer, _per_row(vector, input_ids.shape[0]), positions)
            out.append(nnsight.save(tracer.result))
        return out[0]

    @torch.no_grad()
    def block_output(self, input_ids: torch.Tensor, positions: torch.Tensor, layer: int,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after decoder block `layer` (where vectors are added) at
        `positions` [B]: [B, hidden], float32 (means of these are taken over many prompts)."""
        saved: list = []
        with self.traced.trace(input_ids, attention_mask=attention_mask, fn=self.adapter.base_model().forward):
            hidden = _tensor(self._layer(layer).output)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            saved.append(nnsight.save(hidden[rows, positions.to(hidden.device)].detach().float().clone()))
        return saved[0]

    # -- attention heads -------------------------------------------------------------------
    def head_outputs(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-head attention outputs (the o_proj inputs) at `positions` [B]: [B, L, H, D]."""
        a = self.adapter
        saved: list = []
        with self.traced.trace(input_ids, attention_mask=attention_mask, fn=a.base_model().forward):
            for layer in range(a.n_layers):
                x = self._o_proj(layer).input
                rows = torch.arange(x.shape[0], device=x.device)
                heads = x[rows, positions.to(x.device)].view(x.shape[0], a.n_heads, a.head_dim)
                saved.append(nnsight.save(heads.detach().float().clone()))
        return torch.stack(saved, dim=1)

    def last_logits_with_head_patches(
        self,
        input_ids: torch.Tensor,
        patch_layers: Sequence[int],
        patch_heads: Sequence[int],
        patch_values: torch.Tensor,
        full_model: bool = False,
        **forward_kwargs,
    ) -> torch.Tensor:
        """Logits at the last position [B, V], with row b's head patch_heads[b] at layer
        patch_layers[b] set to patch_values[b] ([D]) at the last position; a row with layer -1
        is left unpatched. forward_kwargs go to the model (e.g. past_key_values). full_model
        runs the whole causal LM, logits at every position, as a plain forward would."""
        result = self._head_patched_forward(input_ids, patch_layers, patch_heads, patch_values, full_model, **forward_kwargs)
        if full_model:
            return result.logits[:, -1]
        return self.adapter.unembed(result.last_hidden_state[:, -1])

    def last_hidden_with_head_patches(self, input_ids, patch_layers, patch_heads, patch_values, **forward_kwargs) -> torch.Tensor:
        """As `last_logits_with_head_patches`, but the final-normed hidden state at the last
        position [B, hidden], so that the caller unembeds it in bounded chunks."""
        return self._head_patched_forward(input_ids, patch_layers, patch_heads, patch_values, False, **forward_kwargs).last_hidden_state[:, -1]

    def _head_patched_forward(self, input_ids, patch_layers, patch_heads, patch_values, full_model, **forward_kwargs):
        """The model's output (the whole causal LM's with full_model, else the base model's) with
        row b's head patch_heads[b] at layer patch_layers[b] set to patch_values[b] at the last
        position (layer -1: unpatched)."""
        a = self.adapter
        # Index plans live on the values' device; each is moved to the device of the output it edits.
        layers = torch.as_tensor(patch_layers, device=patch_values.device)
        heads = torch.as_tensor(patch_heads, device=patch_values.device)
        plan = []
        for layer in sorted(set(layers.tolist()) - {-1}):
            rows = (layers == layer).nonzero().flatten()
            plan.append((layer, rows, heads[rows], patch_values[rows]))
        out: list = []
        forward = self.model.forward if full_model else a.base_model().forward
        with self.traced.trace(input_ids, fn=forward, **forward_kwargs) as tracer:
            for layer, rows, row_heads, values in plan:
                x = self._o_proj(layer).input
                view = x.view(x.shape[0], x.shape[1], a.n_heads, a.head_dim)
                view[rows.to(x.device), -1, row_heads.to(x.device)] = values.to(x.device, x.dtype)
            out.append(nnsight.save(tracer.result))
        return out[0]


@contextmanager
def _standing_in(blocks, forwards: dict):
    """Blocks' forwards replaced (blocks[i].forward = forwards[i]) for the duration, then the
    instance's own (nnsight's wrapper, where it set one) given back."""
    saved = {i: blocks[i].__dict__.get("forward") for i in forwards}
    try:
        for i, forward in forwards.items():
            blocks[i].forward = forward
        yield
    finally:
        for i, forward in saved.items():
            if forward is None:
                del blocks[i].forward
            else:
                blocks[i].forward = forward


def _tensor(output) -> torch.Tensor:
    """A block's output: its hidden states (transformers 5 blocks return the tensor itself)."""
    return output[0] if isinstance(output, tuple) else output


def last_prompt_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Each row's last prompt position [B] in a left-padded batch (generation), on its device."""
    return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)


def _per_row(vector: torch.Tensor, batch: int) -> torch.Tensor:
    return vector.expand(batch, -1) if vector.dim() == 1 else vector
