"""Shared fixtures and helpers of the test suite. Helpers are imported as
`from tests.conftest import ...`; the tiny random models come from ffv_eval.models.tiny."""

import os
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ffv_eval.data.relations import WordPair
from ffv_eval.models.tiny import tiny_gemma3, tiny_llama

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FFV_DATA_DIR") or REPO.parent / "shared" / "data").resolve()


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess under test: offline, the project's autoload and version
    check on, no PYTHONPATH, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("FFV_EVAL_NO_AUTOLOAD", "FFV_EVAL_SKIP_VERSION_CHECK", "PYTHONPATH")}
    env.update(OFFLINE)
    env.update(extra)
    return env


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
    """The real embedded default model: (model, tokenizer). Tests that use it are marked slow."""
    from ffv_eval.models.loading import load_model_and_tokenizer

    torch.set_grad_enabled(False)
    return load_model_and_tokenizer("gemma-3-270m")


# -- a character tokenizer for the tiny models ------------------------------------------------------
class CharTokenizer:
    """Characters to ids 3..102 (ids fit a tiny model's vocabulary); BOS = 1, pad = 0."""

    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + [3 + ord(ch) % 100 for ch in text])

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


PAIRS = [WordPair(w, w[::-1]) for w in ["ab", "cd", "ef", "gh", "ij", "kl", "mn"]]


def same_values(a, b):
    """Equal within 1e-6 (absolute), tensors or (nested) tuples and lists of them."""
    if isinstance(a, (tuple, list)):
        return all(same_values(x, y) for x, y in zip(a, b, strict=True))
    return torch.allclose(a.float(), b.float(), rtol=0, atol=1e-6)


# -- a tokenizer with a dummy prefix and a tiny checkpoint on disk ---------------------------------
def dummy_prefix_tokenizer():
    """A SentencePiece-style BPE tokenizer with Llama 2's legacy dummy prefix (`▁` before the
    text, spaces as `▁`), trained offline here, wrapped as transformers' Llama tokenizer. Like
    Llama 2, it encodes " cold" alone as ["▁", "▁cold"]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    words = ["hot", "cold", "big", "small", "fast", "slow", "happy", "sad", "light", "dark", "up", "down"]
    corpus = [f"Q: {a}\nA: {b}" for a, b in zip(words[::2], words[1::2])] * 20 + [" ".join(words)] * 20
    raw = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=110, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    return LlamaTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", legacy=True,
                              add_bos_token=True)


def tiny_checkpoint(tmp_path, dtype=torch.bfloat16):
    model = tiny_llama().to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(tmp_path / "ckpt")
    dummy_prefix_tokenizer().save_pretrained(tmp_path / "ckpt")
    return model, str(tmp_path / "ckpt")


# -- plain transformers references on the real model ------------------------------------------
def reference_generations(gemma, inputs, layer=None, vector=None, max_new_tokens=8):
    """Plain transformers reference for a relation task's generations: the `Q: x\nA:` prompts
    left-padded in one batch, greedy, `vector` added to block `layer`'s output at the last prompt
    position by a torch forward hook (the prefill pass only), each cut at its first newline as
    lm-eval's until=["\n"] does."""
    model, tok = gemma
    side, tok.padding_side = tok.padding_side, "left"
    batch = tok([f"Q: {word}\nA:" for word in inputs], return_tensors="pt", padding=True)
    tok.padding_side = side

    def add(module, args, output):
        if output.shape[1] == batch.input_ids.shape[1]:  # prefill, not a cached decoding step
            output = output.clone()
            output[:, -1] += vector.to(output.dtype)
        return output

    handle = model.model.layers[layer].register_forward_hook(add) if vector is not None else None
    try:
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        if handle is not None:
            handle.remove()
    return [text.split("\n")[0] for text in tok.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)]


def first_words_match(generation, target):
    """The relation tasks' exact match, written out: the generation's first words equal the
    target's, punctuation at word edges ignored."""
    words = lambda text, n: [w.strip(string.punctuation + "“”‘’«»") for w in text.split()[:n]]  # noqa: E731
    return words(generation, len(target.split())) == words(target, len(target.split()))


# -- toy alignment reports -----------------------------------------------------------------------
def toy_alignment():
    """Profiles where set `good` follows the ratings and set `noise` does not, over the same
    comparisons and subcategories."""
    from ffv_eval.evaluation.alignment import Comparison, prototypicality_alignment, relsim_alignment, relsim_similarities

    torch.manual_seed(0)
    pairs = [(f"a{i}", f"b{i}") for i in range(24)]
    good = {p: torch.randn(6, dtype=torch.float64) for p in pairs}
    noise = {p: torch.randn(6, dtype=torch.float64) for p in pairs}
    comparisons = [Comparison(pairs[i], pairs[j], 4 + 3 * float(torch.corrcoef(torch.stack([good[pairs[i]], good[pairs[j]]]))[0, 1]))
                   for i in range(0, 24, 2) for j in range(1, 24, 2)]
    subcategories = []
    for s in range(6):
        centre = torch.randn(6, dtype=torch.float64)
        members = [(float(k), (f"s{s}c{k}", f"s{s}d{k}")) for k in range(6)]
        for k, (_, pair) in enumerate(members):
            good[pair] = centre * k + torch.randn(6, dtype=torch.float64)
            noise[pair] = torch.randn(6, dtype=torch.float64)
        subcategories.append((f"sub{s}", members))
    sets = {name: {"relsim": relsim_alignment(profiles, comparisons, 100),
                   "semeval_prototypicality": prototypicality_alignment(profiles, subcategories, 100)}
            for name, profiles in (("noise", noise), ("good", good))}
    similarities = {name: relsim_similarities(profiles, comparisons) for name, profiles in (("noise", noise), ("good", good))}
    return sets, similarities, comparisons
