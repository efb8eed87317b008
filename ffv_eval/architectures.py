"""Architecture adapters: where a model family keeps its decoder blocks, attention heads and
norms, and how one head's output reaches the residual stream. Everything else in ffv_eval
asks an adapter instead of knowing module names."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedArchitecture(ValueError):
    pass


@dataclass
class ArchitectureAdapter:
    """Llama-type blocks: h = h + o_proj(heads); the head outputs join the residual stream
    linearly, so a head's contribution is its slice of o_proj applied to its output."""

    model: nn.Module

    @property
    def config(self):
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    # -- module paths (also used to find the same modules through nnsight envoys) --------
    layers_path = "model.layers"
    o_proj_name = "self_attn.o_proj"

    def decoder_layers(self, root=None):
        node = self.model if root is None else root
        for part in self.layers_path.split("."):
            node = getattr(node, part)
        return node

    def o_proj(self, layer: int, root=None):
        node = self.decoder_layers(root)[layer]
        for part in self.o_proj_name.split("."):
            node = getattr(node, part)
        return node

    def base_model(self) -> nn.Module:
        """The decoder stack without the unembedding (returns final-normed hidden states)."""
        return self.model.model

    # -- residual-stream geometry --------------------------------------------------------
    def head_contributions(self, layer: int, mean_head_outputs: torch.Tensor) -> torch.Tensor:
        """[H, D] mean head outputs (o_proj inputs) at one layer -> [H, hidden]: what each
        head adds to the residual stream."""
        weight = self.o_proj(layer).weight.detach().float()  # [hidden, H*D]
        per_head = weight.view(self.hidden_size, self.n_heads, self.head_dim)
        return torch.einsum("khd,hd->hk", per_head, mean_head_outputs.float())

    def unembed(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states -> logits (with any logit soft-capping)."""
        logits = self.model.lm_head(final_hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def decode_residual(self, residual: torch.Tensor) -> torch.Tensor:
        """A residual-stream vector read through the final norm and unembedding."""
        return self.unembed(self.base_model().norm(residual))


@dataclass
class GemmaAdapter(ArchitectureAdapter):
    """Gemma 2/3 blocks: h = h + post_attention_layernorm(o_proj(heads)). The RMSNorm scales by
    (1 + weight) and divides by the RMS of the whole attention output, so a head's contribution
    is linearised around the mean attention output at that layer."""

    def post_attention_norm(self, layer: int) -> nn.Module:
        return self.decoder_layers()[layer].post_attention_layernorm

    def head_contributions(self, layer: int, mean_head_outputs: torch.Tensor) -> torch.Tensor:
        raw = super().head_contributions(layer, mean_head_outputs)  # [H, hidden] before the norm
        full_output = raw.sum(dim=0)  # o_proj of the full mean attention output
        norm = self.post_attention_norm(layer)
        rms = torch.sqrt(full_output.pow(2).mean() + norm.eps)
        return raw / rms * (1.0 + norm.weight.detach().float())


ADAPTERS: dict[str, type[ArchitectureAdapter]] = {
    "llama": ArchitectureAdapter,
    "mistral": ArchitectureAdapter,
    "qwen2": ArchitectureAdapter,
    "qwen3": ArchitectureAdapter,
    "olmo": ArchitectureAdapter,
    "gemma2": GemmaAdapter,
    "gemma3": GemmaAdapter,
    "gemma3_text": GemmaAdapter,
}


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    cfg = model.config
    model_type = getattr(cfg, "model_type", None)
    if model_type == "gemma3" and hasattr(cfg, "text_config"):
        model_type = "gemma3_text"
    if model_type not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"no architecture adapter for model_type '{model_type}' "
            f"(supported: {', '.join(sorted(ADAPTERS))}); add one in ffv_eval/architectures.py"
        )
    return ADAPTERS[model_type](model)
