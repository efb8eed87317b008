"""Architecture adapters: where a model family keeps its decoder blocks, attention heads and
norms, and how one head's output reaches the residual stream. Everything else in ffv_eval
asks an adapter instead of knowing module names.

The per-family facts are one table, `FAMILIES`, read off the transformers 5.24 modelling code:

- every family concatenates its heads into a [B, S, H*D] tensor that is the *input* of one
  output projection (`o_proj`, GPT-2's `attn.c_proj`, GPT-J's `attn.out_proj`, GPT-NeoX's
  `attention.dense`), so head outputs are read and patched there, whatever the QKV layout
  (fused `c_attn`, `query_key_value`, `qkv_proj`, or grouped-query attention);
- the projection is an `nn.Linear` ([out, in] weight) except GPT-2's `Conv1D` ([in, out]); a
  bias on it (GPT-2, GPT-NeoX) is not per head and is kept out of the head contributions;
- Llama, Mistral, Qwen 2/3, Gemma 1, Phi-3, OLMo, GPT-2 add the projection's output to the
  residual stream as it is, and so do the parallel blocks of GPT-J and GPT-NeoX (attention and
  MLP read the same input and are both added); their `post_attention_layernorm` (where they
  have one) is the norm in front of the MLP, not on the attention path;
- Gemma 2/3 put the attention output through `post_attention_layernorm` (RMS norm, scale
  1 + weight) before the residual, and OLMo 2/3 too (RMS norm, scale weight): a head's
  contribution is then linearised around the mean attention output (see `PostNormAdapter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ffv_eval.errors import FFVError


class UnsupportedArchitecture(FFVError, ValueError):
    """A model whose modules or config no architecture adapter can read, or that is not a causal LM."""


@dataclass(frozen=True)
class Family:
    """Where one model family keeps things. Paths are dotted attribute names: `layers` and
    `base` from the causal LM, `attn_out` and `attn_norm` inside one decoder block,
    `final_norm` inside the base model, `unembedding` on the causal LM."""

    name: str
    layers: str  # the ModuleList of decoder blocks
    attn_out: str  # projection whose input is the concatenated heads [B, S, H*D]
    base: str  # the decoder stack returning final-normed hidden states (no unembedding)
    final_norm: str
    unembedding: str = "lm_head"
    conv1d: bool = False  # weight stored [in, out] (GPT-2's Conv1D) instead of nn.Linear's [out, in]
    attn_norm: str | None = None  # norm applied to the attention output before the residual
    attn_norm_offset: float = 0.0  # that norm scales by (offset + weight): Gemma 1, OLMo 2 0
    softcap: str | None = None  # config name of the final-logit soft-cap the causal LM applies
    n_layers_key: str = "num_hidden_layers"  # config names
    n_heads_key: str = "num_attention_heads"
    hidden_key: str = "hidden_size"
    head_dim_key: str | None = "head_dim"  # None: the family always uses hidden // heads


_LLAMA = Family("Llama-type", layers="model.layers", attn_out="self_attn.o_proj", base="model", final_norm="norm")
_GPT2 = Family("GPT-2", layers="transformer.h", attn_out="attn.c_proj", base="transformer", final_norm="ln_f",
               conv1d=True, n_layers_key="n_layer", n_heads_key="n_head", hidden_key="n_embd", head_dim_key=None)
_GEMMA2 = Family("Gemma 2/3", layers="model.layers", attn_out="self_attn.o_proj", base="model", final_norm="norm",
                 attn_norm="post_attention_layernorm", attn_norm_offset=1.0, softcap="final_logit_softcapping")
_OLMO2 = Family("OLMo 2/3", layers="model.layers", attn_out="self_attn.o_proj", base="model", final_norm="norm",
                attn_norm="post_attention_layernorm", attn_norm_offset=0.0)

FAMILIES: dict[str, Family] = {  # model_type -> family
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,  # q_norm / k_norm act inside attention, before o_proj
    "gemma": _LLAMA,  # Gemma 1: Llama-type residual path (its norms scale by 1 + weight, final norm included)
    "phi3": _LLAMA,  # fused qkv_proj; o_proj input is still [B, S, H*D]
    "olmo": _LLAMA,
    "gpt2": _GPT2,
    "gptj": Family("GPT-J (parallel attention and MLP)", layers="transformer.h", attn_out="attn.out_proj",
                   base="transformer", final_norm="ln_f", n_layers_key="n_layer", n_heads_key="n_head",
                   hidden_key="n_embd", head_dim_key=None),
    # GPT-NeoX / Pythia: the unembedding was `embed_out`; transformers 5 loads it as `lm_head`
    # (conversion_mapping.py). Parallel or sequential residual (use_parallel_residual), both
    # add attention.dense's output unchanged.
    "gpt_neox": Family("GPT-NeoX", layers="gpt_neox.layers", attn_out="attention.dense", base="gpt_neox",
                       final_norm="final_layer_norm", head_dim_key=None),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    # Gemma 3 4B+ (Gemma3ForConditionalGeneration): the text decoder sits under
    # model.language_model, and the top-level forward applies no final-logit soft-cap.
    "gemma3": Family("Gemma 3 multimodal", layers="model.language_model.layers", attn_out="self_attn.o_proj",
                     base="model.language_model", final_norm="norm", attn_norm="post_attention_layernorm",
                     attn_norm_offset=1.0),
    "olmo2": _OLMO2,
    "olmo3": _OLMO2,
}


def _resolve(node, path: str):
    for part in path.split("."):
        node = getattr(node, part)
    return node


@dataclass
class ArchitectureAdapter:
    """Blocks whose attention output joins the residual stream unchanged: a head's
    contribution is its slice of the output projection applied to its output."""

    model: nn.Module
    family: Family | None = None  # default: looked up from the model's model_type

    def __post_init__(self):
        if self.family is None:
            self.family = family_of(self.model)
        self._check_structure()

    @property
    def config(self):
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def n_layers(self) -> int:
        return getattr(self.config, self.family.n_layers_key)

    @property
    def n_heads(self) -> int:
        return getattr(self.config, self.family.n_heads_key)

    @property
    def head_dim(self) -> int:
        own = getattr(self.config, self.family.head_dim_key, None) if self.family.head_dim_key else None
        return own or self.hidden_size // self.n_heads

    @property
    def hidden_size(self) -> int:
        return getattr(self.config, self.family.hidden_key)

    # -- module paths (also used to find the same modules through nnsight envoys) --------
    @property
    def layers_path(self) -> str:
        return self.family.layers

    @property
    def o_proj_name(self) -> str:
        return self.family.attn_out

    def decoder_layers(self, root=None):
        return _resolve(self.model if root is None else root, self.family.layers)

    def o_proj(self, layer: int, root=None):
        """The attention output projection of block `layer`: its input is the concatenated
        heads [B, S, H*D]."""
        return _resolve(self.decoder_layers(root)[layer], self.family.attn_out)

    def base_model(self, root=None) -> nn.Module:
        """The decoder stack without the unembedding (returns final-normed hidden states)."""
        return _resolve(self.model if root is None else root, self.family.base)

    def final_norm(self) -> nn.Module:
        return _resolve(self.base_model(), self.family.final_norm)

    def unembedding(self) -> nn.Module:
        return _resolve(self.model, self.family.unembedding)

    # -- residual-stream geometry --------------------------------------------------------
    def _per_head_weight(self, layer: int) -> torch.Tensor:
        """The output projection's weight as [hidden, H, D], in float32 (see head_contributions)."""
        weight = self.o_proj(layer).weight.detach()
        if self.family.conv1d:  # Conv1D computes x @ W with W [in, out]
            weight = weight.t()
        return weight.float().reshape(self.hidden_size, self.n_heads, self.head_dim)

    def _raw_contributions(self, layer: int, mean_head_outputs: torch.Tensor) -> torch.Tensor:
        weight = self._per_head_weight(layer)
        heads = mean_head_outputs.to(weight.device, torch.float32)
        return torch.einsum("khd,hd->hk", weight, heads)

    def output_bias(self, layer: int) -> torch.Tensor | None:
        """The output projection's bias ([hidden], float32, on its device), or None. It is not
        part of any head's contribution."""
        bias = getattr(self.o_proj(layer), "bias", None)
        return None if bias is None else bias.detach().float()

    def head_contributions(self, layer: int, mean_head_outputs: torch.Tensor) -> torch.Tensor:
        """[H, D] mean head outputs (o_proj inputs) at one layer -> [H, hidden]: what each
        head adds to the residual stream, without the projection's bias (`bias_contribution`).

        Computed in float32 on purpose, whatever the model's dtype: the contributions are
        summed over heads and layers into a vector that is stored and reused, and in bfloat16
        each product would round to 8 significant bits, so the sum of the heads would drift
        from the projection of their sum. Returned on the weight's device."""
        return self._raw_contributions(layer, mean_head_outputs)

    def bias_contribution(self, layer: int, mean_head_outputs: torch.Tensor) -> torch.Tensor:
        """What the projection's bias adds to the residual stream at this layer ([hidden],
        float32, on the weight's device; zeros without a bias), so that
        head_contributions(...).sum(0) + bias_contribution(...) is the attention's whole
        contribution for these head outputs."""
        bias = self.output_bias(layer)
        if bias is None:
            weight = self.o_proj(layer).weight
            return torch.zeros(self.hidden_size, device=weight.device, dtype=torch.float32)
        return bias

    def unembed(self, final_hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states -> logits (with the logit soft-capping the model applies);
        with `token_ids` [K], only those tokens' logits [..., K] (a linear unembedding reads only
        their K rows of the matrix)."""
        head = self.unembedding()
        if token_ids is None:
            logits = head(final_hidden)
        elif isinstance(head, nn.Linear):
            token_ids = token_ids.to(head.weight.device)
            bias = None if head.bias is None else head.bias[token_ids]
            logits = nn.functional.linear(final_hidden, head.weight[token_ids], bias)
        else:
            logits = head(final_hidden)[..., token_ids.to(final_hidden.device)]
        cap = getattr(self.config, self.family.softcap, None) if self.family.softcap else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def decode_residual(self, residual: torch.Tensor) -> torch.Tensor:
        """A residual-stream vector read through the final norm and unembedding (moved to the
        unembedding's device and dtype first)."""
        weight = self.unembedding().weight
        return self.unembed(self.final_norm()(residual.to(weight.device, weight.dtype)))

    # -- checks --------------------------------------------------------------------------
    def _check_structure(self) -> None:
        """Paths and sizes agree with the model, before any model work (no forward pass)."""
        f = self.family
        where = f"{type(self.model).__name__} (model_type '{getattr(self.model.config, 'model_type', None)}')"
        fix = ("; if this class of the family keeps its modules elsewhere, give it its own entry in FAMILIES "
               "in ffv_eval/models/architectures.py")
        for key in (f.n_layers_key, f.n_heads_key, f.hidden_key):
            if not isinstance(getattr(self.config, key, None), int):
                raise UnsupportedArchitecture(f"{where}: config has no integer '{key}', which the {f.name} adapter reads{fix}")
        try:
            layers = self.decoder_layers()
            projection = self.o_proj(0)
            self.final_norm()
            self.unembedding()
            if f.attn_norm:
                _resolve(layers[0], f.attn_norm)
        except (AttributeError, IndexError, TypeError) as err:
            raise UnsupportedArchitecture(f"{where}: module missing where the {f.name} adapter looks ({err}){fix}") from err
        if len(layers) != self.n_layers:
            raise UnsupportedArchitecture(f"{where}: {len(layers)} blocks at '{f.layers}' but config says {self.n_layers}{fix}")
        shape = tuple(projection.weight.shape)
        expected = (self.n_heads * self.head_dim, self.hidden_size) if f.conv1d else (self.hidden_size, self.n_heads * self.head_dim)
        if shape != expected:
            raise UnsupportedArchitecture(
                f"{where}: '{f.attn_out}' weight is {shape}, expected {expected} for {self.n_heads} heads x "
                f"{self.head_dim} dims into {self.hidden_size}{fix}"
            )


@dataclass
class PostNormAdapter(ArchitectureAdapter):
    """Blocks that norm the attention output before the residual (Gemma 2/3, OLMo 2/3):
    h = h + g * o / rms(o), o = o_proj(heads) (+ bias), g = offset + weight. The RMS is taken
    over the whole attention output, so a head's contribution is linearised around the mean
    attention output o* at that layer: g * W_h x_h / rms(o*). At that point the contributions
    (+ bias_contribution) sum exactly to norm(o*); away from it they are a first-order
    approximation."""

    def post_attention_norm(self, layer: int) -> nn.Module:
        return _resolve(self.decoder_layers()[layer], self.family.attn_norm)

    def _norm_scale(self, layer: int, raw: torch.Tensor) -> torch.Tensor:
        """g / rms(o*) as a [hidden] float32 vector; raw [H, hidden] are the unnormed head terms."""
        norm = self.post_attention_norm(layer)
        eps = getattr(norm, "eps", None)
        eps = getattr(norm, "variance_epsilon", None) if eps is None else eps
        if eps is None:
            raise UnsupportedArchitecture(f"{type(norm).__name__} at '{self.family.attn_norm}' has no eps / variance_epsilon")
        full = raw.sum(dim=0)
        bias = self.output_bias(layer)
        if bias is not None:
            full = full + bias
        rms = torch.sqrt(full.pow(2).mean() + eps)
        return (self.family.attn_norm_offset + norm.weight.detach().float().to(raw.device)) / rms

    def head_contributions(self, layer: int, mean_head_outputs: torch.Tensor) -> torch.Tensor:
        raw = self._raw_contributions(layer, mean_head_outputs)  # float32, as in the base class
        return raw * self._norm_scale(layer, raw)

    def bias_contribution(self, layer: int, mean_head_outputs: torch.Tensor) -> torch.Tensor:
        plain = super().bias_contribution(layer, mean_head_outputs)
        return plain * self._norm_scale(layer, self._raw_contributions(layer, mean_head_outputs))


GemmaAdapter = PostNormAdapter  # the old name (Gemma 2/3 adapters are PostNormAdapters)


def family_of(model: nn.Module) -> Family:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedArchitecture(
            f"no architecture adapter for model_type '{model_type}' ({type(model).__name__}); supported model_types: "
            f"{', '.join(sorted(FAMILIES))}. To add one, add an entry to FAMILIES in ffv_eval/models/architectures.py "
            f"giving: the path to the decoder layers, the attention output projection whose input is the "
            f"concatenated heads [B, S, H*D] and its weight layout (nn.Linear [out, in] or Conv1D [in, out]), "
            f"the base model that returns final-normed hidden states and its final norm, the unembedding, the "
            f"config names of layers / heads / hidden size / head dim, any final-logit soft-cap, and the norm "
            f"applied to the attention output before the residual, if the block has one"
        )
    return FAMILIES[model_type]


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    family = family_of(model)
    cls = PostNormAdapter if family.attn_norm else ArchitectureAdapter
    return cls(model, family)

