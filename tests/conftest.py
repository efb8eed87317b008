import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FFV_DATA_DIR") or REPO.parent / "shared" / "data").resolve()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3():
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


@pytest.fixture(params=["llama", "gemma3"])
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_gemma3()


@pytest.fixture(autouse=True)
def project_data_unless_asked(monkeypatch):
    """FFV_DATA_DIR is the data directory of the todd_<relation> and analogy tasks, and makes
    load_relation (ffv extract / train / decode) read Todd et al.'s files; tests say which data
    they use, so it is cleared here and given back through the `shared_data` fixture."""
    monkeypatch.delenv("FFV_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "function_vectors").is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (set FFV_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gemma():
    """The real embedded default model: (model, tokenizer)."""
    from ffv_eval.models.loading import load_model_and_tokenizer

    torch.set_grad_enabled(False)
    return load_model_and_tokenizer("gemma-3-270m")
