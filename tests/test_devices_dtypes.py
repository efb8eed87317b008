"""Every job on any device and dtype: placement arguments and their errors, tensors made on the
model's device, float32 where precision needs it, a fingerprint that ignores dtype and device,
answer tokens found as lm-eval finds continuation tokens, and logits bounded to LOGIT_ROWS rows
at a time. Tiny random models for the mechanics; the real tokenizers and Gemma 3 270M where the
behaviour depends on them."""

import ast
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ffv_eval import VECTORS_DIR
from ffv_eval.vectors import function_vectors as fv
from ffv_eval.models import tokens
from ffv_eval.vectors import scoring
from ffv_eval.vectors.basis import Basis
from ffv_eval.vectors.composite_fit import Analogy, MapSettings, completion_scores, fit_composite_map
from ffv_eval.vectors.composite import basis_logprobs
from ffv_eval.vectors.decoding import decode_vector
from ffv_eval.vectors.fine_tuning import TrainingSettings, train_function_vector, train_function_vectors
from ffv_eval.models.loading import Placement, PlacementError, input_device, load_model_and_tokenizer, model_fingerprint
from ffv_eval.models.patching import Patcher
from ffv_eval.data.prompts import query_text
from ffv_eval.data.relations import WordPair, load_relation, project_relations
from tests.conftest import tiny_gemma3, tiny_llama

REPO = Path(__file__).resolve().parent.parent


class CharTokenizer:
    """Characters to ids 3..102 (ids fit a tiny model's vocabulary); BOS = 1, pad = 0."""

    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + [3 + ord(ch) % 100 for ch in text])

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


PAIRS = [WordPair(w, w[::-1]) for w in ["ab", "cd", "ef", "gh", "ij", "kl", "mn"]]


# -- 1. placement: --device, --dtype, --device-map -------------------------------------------
def _one_old_gpu(monkeypatch, count=1, capability=(7, 5)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")


def test_placement_errors_name_the_problem_and_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Placement().checked() == Placement("cpu", "auto", None)
    for dtype in ("float32", "bfloat16", "float16"):  # CPUs run all three (torch >= 2.1 matmuls)
        assert Placement("cpu", dtype).checked().dtype == dtype
    for placement, message in (
        (Placement("cuda"), "--device cuda: no CUDA GPU is available.*use --device cpu"),
        (Placement("tpu0"), "--device 'tpu0': unknown device; use cpu, cuda or cuda:N"),
        (Placement("meta"), "--device meta: meta tensors hold no data"),
        (Placement("cpu", "int8"), "--dtype 'int8': unknown dtype; use one of auto, float32, bfloat16, float16"),
        (Placement("cpu", "auto", "auto"), "--device cpu and --device-map auto exclude each other"),
        (Placement(None, "auto", "everywhere"), "--device-map 'everywhere': unknown placement; use one of auto"),
    ):
        with pytest.raises(PlacementError, match=message):
            placement.checked()

    _one_old_gpu(monkeypatch)
    assert Placement().checked().device == "cuda"
    assert Placement("cuda:0", "float16").checked().device == "cuda:0"
    with pytest.raises(PlacementError, match=r"--device cuda:3: there is 1 CUDA GPU \(cuda:0..cuda:0\); pick one of them"):
        Placement("cuda:3").checked()
    with pytest.raises(PlacementError, match=r"--dtype bfloat16: cuda:0 \(Tesla T4, compute capability 7.5\) has no bfloat16 "
                                             r"support; use --dtype float16 or float32"):
        Placement("cuda:0", "bfloat16").checked()
    with pytest.raises(PlacementError, match="no bfloat16 support"):
        Placement(None, "bfloat16", "auto").checked()
    _one_old_gpu(monkeypatch, count=2, capability=(9, 0))
    assert Placement("cuda:1", "bfloat16").checked().device == "cuda:1"


def test_lm_eval_gets_the_placement_as_hflm_model_args(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Placement().lm_eval_args() == {"device": "cpu", "dtype": "auto"}
    assert Placement("cpu", "bfloat16").lm_eval_args() == {"device": "cpu", "dtype": "bfloat16"}
    assert Placement(None, "float16", "auto").lm_eval_args() == {"dtype": "float16", "parallelize": True, "device_map": "auto"}


def test_compare_passes_the_placement_to_lm_eval(monkeypatch):
    from ffv_eval.harness import model as lm_model
    from ffv_eval.evaluation.compare import compare_conditions

    seen = {}

    class Stop(Exception):
        pass

    def capture(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(lm_model, "FFVPatchedLM", capture)
    with pytest.raises(Stop):
        compare_conditions("gemma-3-270m", ["antonym"], kinds=["fv"], placement=Placement("cpu", "bfloat16"))
    assert seen == {"pretrained": "gemma-3-270m", "vector": "none", "batch_size": 16, "device": "cpu", "dtype": "bfloat16"}


MODEL_SUBCOMMANDS = [
    ["extract", "--relation", "antonym"], ["train", "--relation", "antonym"], ["decode", "antonym"], ["build-library"],
    ["compare"], ["check"], ["basis", "build"], ["compose", "--pair", "hot:cold"], ["align"],
    ["explain-cfv", "leaderboards/results/analogies", "--task", "u2_analogy"],
]


@pytest.mark.parametrize("args", MODEL_SUBCOMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_model_subcommand_refuses_a_missing_device_before_any_model_work(args, monkeypatch, capsys, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from ffv_eval.models import loading as model_loading
    from ffv_eval.cli import main

    def refuse(*a, **k):
        raise AssertionError("model work started before the placement was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(model_loading, "resolve_pretrained", refuse)
    monkeypatch.setattr(HFLM, "__init__", refuse)
    monkeypatch.chdir(tmp_path)
    for extra, message in ((["--device", "cuda:3"], "--device cuda:3: no CUDA GPU is available"),
                           (["--dtype", "half-ish"], "--dtype 'half-ish': unknown dtype"),
                           (["--device", "cpu", "--device-map", "auto"], "exclude each other")):
        assert main([*args, *extra]) == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _tiny_checkpoint(tmp_path, dtype=torch.bfloat16):
    model = tiny_llama().to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(tmp_path / "ckpt")
    dummy_prefix_tokenizer().save_pretrained(tmp_path / "ckpt")
    return model, str(tmp_path / "ckpt")


def test_loading_follows_the_checkpoint_dtype_or_the_one_asked_for(tmp_path):
    saved, path = _tiny_checkpoint(tmp_path)
    loaded = {}
    for dtype, expected in (("auto", torch.bfloat16), ("float32", torch.float32), ("float16", torch.float16)):
        model, tokenizer = load_model_and_tokenizer(path, device="cpu", dtype=dtype)
        assert model.dtype == expected and not model.training and not any(p.requires_grad for p in model.parameters())
        loaded[dtype] = model
    placed, _ = load_model_and_tokenizer(path, dtype="float32", device_map="auto")
    assert input_device(placed) == torch.device("cpu") and {p.device.type for p in placed.parameters()} == {"cpu"}
    prints = {model_fingerprint(m) for m in [saved, placed, *loaded.values()]}
    assert len(prints) == 1


# -- 2. the fingerprint ------------------------------------------------------------------------
def test_fingerprint_ignores_dtype_and_tells_checkpoints_apart():
    model = tiny_llama()
    reference = model_fingerprint(model)
    for dtype in (torch.bfloat16, torch.float16):
        assert model_fingerprint(tiny_llama().to(dtype)) == reference
    torch.manual_seed(1)
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM(model.config).eval()  # the same config, other weights
    assert model_fingerprint(other) != reference
    perturbed = tiny_llama()
    with torch.no_grad():
        weight = perturbed.get_input_embeddings().weight
        weight += 0.05 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    assert model_fingerprint(perturbed) != reference
    untied = tiny_llama()
    with torch.no_grad():
        untied.lm_head.weight.neg_()
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight
    assert model_fingerprint(untied) != reference


@pytest.mark.slow
def test_gemma_fingerprint_is_one_for_three_dtypes_and_matches_the_shipped_vectors():
    import json

    shipped = {json.loads(p.read_text())["model_fingerprint"] for p in (VECTORS_DIR / "gemma-3-270m").glob("*/*.json")}
    shipped.add(json.loads((VECTORS_DIR / "gemma-3-270m" / "quality-baseline.json").read_text())["model_fingerprint"])
    assert len(shipped) == 1
    prints = set()
    for dtype in ("float32", "bfloat16", "float16"):
        model, _ = load_model_and_tokenizer("gemma-3-270m", device="cpu", dtype=dtype)
        prints.add(model_fingerprint(model))
    assert prints == shipped
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight.add_(weight.float().std().to(weight.dtype) * 0.02)  # a perturbed copy: every entry nudged up
    assert model_fingerprint(model) not in shipped


# -- 3. answer tokens as lm-eval finds them ------------------------------------------------------
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


def lm_eval_continuation(tokenizer, context: str, continuation: str) -> list[int]:
    """The reference: lm-eval's own HFLM._encode_pair and tok_encode, on a bare instance."""
    from lm_eval.models.huggingface import HFLM

    hflm = HFLM.__new__(HFLM)
    hflm.tokenizer, hflm.add_bos_token, hflm.backend, hflm.custom_prefix_token_id = tokenizer, None, "causal", None
    return hflm._encode_pair(context, continuation)[1]


def _check_answer_tokens(tokenizer, pairs):
    for pair in pairs:
        prompt = query_text(pair.input)
        token = tokens.answer_token_id(tokenizer, prompt, pair.output)
        assert token == lm_eval_continuation(tokenizer, prompt, " " + pair.output)[0], pair
        piece = tokenizer.convert_ids_to_tokens([token])[0]
        assert piece not in ("▁", "Ġ", " ") and tokenizer.decode([token]).strip(), (pair, piece)
        assert pair.output.startswith(tokenizer.decode([token]).strip()), (pair, piece)


def test_answer_tokens_with_a_dummy_prefix_sentencepiece_tokenizer_are_the_words_first_piece():
    tokenizer = dummy_prefix_tokenizer()
    pairs = [WordPair("hot", "cold"), WordPair("big", "smaller"), WordPair("up", "downhill"), WordPair("fast", "slowest")]
    for pair in pairs:  # the problem: the word tokenized alone starts with a bare "▁"
        alone = tokenizer(" " + pair.output, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(alone)[0] == "▁"
    _check_answer_tokens(tokenizer, pairs)
    prompts = tokens.encode_prompts(tokenizer, [query_text(p.input) for p in pairs], [p.output for p in pairs])
    assert prompts.input_ids[0] == tokenizer(query_text("hot")).input_ids
    assert tokenizer.convert_ids_to_tokens(prompts.answer_ids) == ["▁cold", "▁small", "▁down", "▁slow"]


def sentencepiece_tokenizer(directory):
    """A real SentencePiece model with a dummy prefix, trained offline by the `sentencepiece`
    trainer with Llama 2's settings (BPE, byte fallback, whitespace kept as is), loaded through
    transformers' SentencePiece backend in legacy mode as Llama 2 and Mistral v0.1 are."""
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    words = ["hot", "cold", "big", "small", "fast", "slow", "happy", "sad", "light", "dark", "up", "down"]
    corpus = ([f"Q: {a}\nA: {b}" for a, b in zip(words[::2], words[1::2])] * 20
              + [f"{a} {b}" for a in words for b in words] + ["smaller downhill slowest"] * 5)
    prefix = str(directory / "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=340, model_type="bpe", add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", byte_fallback=True, hard_vocab_limit=False,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return SentencePieceBackend(vocab_file=prefix + ".model", legacy=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_answer_tokens_with_a_trained_sentencepiece_model_are_the_words_first_piece(tmp_path):
    tokenizer = sentencepiece_tokenizer(tmp_path)
    pairs = [WordPair("hot", "cold"), WordPair("big", "small"), WordPair("up", "downhill"), WordPair("fast", "slowest")]
    for pair in pairs:  # the problem: the word tokenized alone starts with a bare "▁" piece
        assert tokenizer.convert_ids_to_tokens(tokenizer(" " + pair.output, add_special_tokens=False).input_ids)[0] == "▁"
    _check_answer_tokens(tokenizer, pairs)
    prompts = tokens.encode_prompts(tokenizer, [query_text(p.input) for p in pairs], [p.output for p in pairs])
    assert tokenizer.convert_ids_to_tokens(prompts.answer_ids[:2]) == ["▁cold", "▁small"]


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma-3-270m"])
def test_answer_tokens_of_the_embedded_tokenizers_match_lm_eval(model):
    from transformers import AutoTokenizer

    from ffv_eval.models.loading import resolve_pretrained

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(model))
    pairs = [p for name in project_relations() for p in load_relation(name).test[:8]]
    _check_answer_tokens(tokenizer, pairs)


def test_continuations_move_trailing_whitespace_and_refuse_a_merged_prompt():
    from transformers import AutoTokenizer

    from ffv_eval.models.loading import resolve_pretrained

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained("smollm2-135m"))
    assert tokens.encode_continuation(tokenizer, "Q: hot\nA: ", "cold") == tokens.encode_continuation(tokenizer, "Q: hot\nA:", " cold")
    assert tokens.encode_continuation(tokenizer, "Q: hot\nA: ", "cold")[1] == lm_eval_continuation(tokenizer, "Q: hot\nA: ", "cold")
    with pytest.raises(ValueError, match="the prompt's tokens are not a prefix of the tokens of prompt \\+ answer"):
        tokens.encode_continuation(tokenizer, "Q: hot\nA: co", "ld")


# -- 4. bounded logits ----------------------------------------------------------------------------
class RowCounter:
    """Wraps an adapter's unembedding and records the rows of every call."""

    def __init__(self, adapter):
        self.inner, self.rows = adapter.unembed, []
        adapter.unembed = self

    def __call__(self, hidden):
        self.rows.append(hidden.reshape(-1, hidden.shape[-1]).shape[0])
        return self.inner(hidden)


def _bounded_and_unbounded(monkeypatch, run, rows=3):
    """run(patcher) with LOGIT_ROWS = rows (and the unembedding's row counts), then unbounded."""
    patcher = Patcher(tiny_llama())
    counter = RowCounter(patcher.adapter)
    monkeypatch.setattr(scoring, "LOGIT_ROWS", rows)
    bounded = run(patcher)
    seen = list(counter.rows)
    monkeypatch.setattr(scoring, "LOGIT_ROWS", 10**9)
    return bounded, run(patcher), seen


def _same(a, b):
    if isinstance(a, (tuple, list)):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return torch.allclose(a.float(), b.float(), rtol=0, atol=1e-6)


def test_answer_scores_unembed_at_most_logit_rows_and_equal_the_unchunked_scores(monkeypatch):
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    bounded, full, rows = _bounded_and_unbounded(monkeypatch, lambda p: scoring.answer_scores(p, CharTokenizer(), PAIRS, 1, vectors))
    assert max(rows) == 3 and sum(rows) == 3 * len(PAIRS)
    assert _same(bounded, full) and bounded[0].shape == (3, len(PAIRS))


def test_mediation_batches_hold_at_most_logit_rows(monkeypatch):
    prompts = tokens.PromptSet(input_ids=[random.Random(i).sample(range(1, 120), 9) for i in range(2)], answer_ids=[5, 17])
    heads = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    bounded, full, rows = _bounded_and_unbounded(monkeypatch, lambda p: fv.indirect_effects(p, prompts, heads, head_batch=128))
    assert max(rows) == 3 and bounded.abs().max() > 1e-4 and _same(bounded, full)


def test_basis_posterior_unembeds_at_most_logit_rows(monkeypatch):
    basis = Basis([f"r{i}" for i in range(7)], torch.randn(7, 32, generator=torch.Generator().manual_seed(2)), 1, "x", Path("."))
    stems = [("ab", "ba"), ("cd", "dc")]
    bounded, full, rows = _bounded_and_unbounded(monkeypatch, lambda p: basis_logprobs(p, CharTokenizer(), basis, stems))
    assert max(rows) == 3 and bounded.shape == (2, 7) and _same(bounded, full)


def test_training_with_bounded_logits_equals_unbounded_training(monkeypatch):
    initials = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    settings = TrainingSettings(n_pairs=5, steps=4, batch_size=4)
    bounded, full, rows = _bounded_and_unbounded(
        monkeypatch, lambda p: train_function_vectors(p, CharTokenizer(), [PAIRS[:5], PAIRS[2:]], 1, initials, settings))
    assert max(rows) == 3  # 8 rows per step, forward and recomputed in backward
    for b, f in zip(bounded, full):
        assert _same(b.vector, f.vector) and b.losses == pytest.approx(f.losses, abs=1e-6)
        assert not torch.equal(b.vector, b.initial_vector)


def test_composite_map_fit_with_bounded_logits_equals_unbounded(monkeypatch):
    basis = Basis(["a", "b", "c"], torch.randn(3, 32, generator=torch.Generator().manual_seed(4)), 1, "x", Path("."))
    analogies = [Analogy(p.input, p.output, q.input, q.output, "a") for p, q in zip(PAIRS, PAIRS[1:])]

    def fit(patcher):
        return fit_composite_map(patcher, CharTokenizer(), basis, analogies, MapSettings(steps=3, batch_size=5)).weight

    bounded, full, rows = _bounded_and_unbounded(monkeypatch, fit)
    assert max(rows) == 3 and _same(bounded, full) and not torch.equal(bounded, torch.eye(3))


# -- 1. tensors on the model's device ----------------------------------------------------------
FACTORIES = {"tensor", "zeros", "ones", "full", "arange", "empty", "eye", "randn", "rand", "randint", "linspace"}
DEVICE_MODULES = ["vectors/function_vectors", "vectors/scoring", "models/tokens", "vectors/fine_tuning", "vectors/composite", "vectors/composite_fit", "vectors/basis", "vectors/decoding",
                  "evaluation/quality_gate", "evaluation/alignment", "models/loading", "models/patching"]


def test_no_tensor_is_made_without_naming_its_device():
    """Static: every torch factory call in the modules that feed the model names its device."""
    missing = []
    for name in DEVICE_MODULES:
        path = REPO / "ffv_eval" / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                missing.append(f"{path.name}:{node.lineno}: torch.{node.func.attr}(...)")
    assert not missing, "tensors made without a device:\n" + "\n".join(missing)


def _pure_functions(patcher, tokenizer, vectors):
    """Each step of extraction, training, basis, composite and decoding on small inputs."""
    prompts = tokens.PromptSet(input_ids=[random.Random(i).sample(range(1, 120), 9) for i in range(2)], answer_ids=[5, 17])
    basis = Basis(["a", "b"], vectors, 1, "x", Path("."))
    mean_heads = fv.mean_head_outputs(patcher, prompts, 0)
    torch.manual_seed(0)
    return {
        "mean_heads": mean_heads,
        "vector": fv.assemble_vector(patcher, mean_heads, [(0, 1, 0.0), (2, 3, 0.0)]),
        "scores": scoring.answer_scores(patcher, tokenizer, PAIRS, 1, vectors),
        "ffv": train_function_vector(patcher, tokenizer, PAIRS[:4], 1, vectors[0], TrainingSettings(n_pairs=4, steps=2, batch_size=2)).vector,
        "random": train_function_vector(patcher, tokenizer, PAIRS[:4], 1, vectors[0],
                                        TrainingSettings(n_pairs=4, steps=1, batch_size=2, init="random")).initial_vector,
        "posterior": basis_logprobs(patcher, tokenizer, basis, [("ab", "ba"), ("cd", "dc")]),
        "completion": completion_scores(patcher, tokenizer, [Analogy("ab", "ba", "cd", "dc")], 1, vectors[:1]),
        "map": fit_composite_map(patcher, tokenizer, basis, [Analogy("ab", "ba", "cd", "dc", "a")] * 5, MapSettings(steps=2, batch_size=2)).weight,
        "decoding": torch.tensor(decode_vector(patcher.adapter, tokenizer, vectors[0], PAIRS, 5).hits, device="cpu"),
    }


def test_every_tensor_meets_the_model_on_its_device():
    """Behavioural: with torch's default device set to `meta` (no data, no arithmetic with real
    tensors), a tensor made without the model's device would break the run or its results. The
    model is on the CPU; every result must equal the run with the default device."""
    patcher = Patcher(tiny_llama())  # Llama: transformers' own sliding-window cache (Gemma) assumes the default device
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    expected = _pure_functions(patcher, CharTokenizer(), vectors)
    torch.set_default_device("meta")
    try:
        got = _pure_functions(patcher, CharTokenizer(), vectors)
    finally:
        torch.set_default_device(None)
    for name in expected:
        assert _same(got[name], expected[name]), name
        for tensor in got[name] if isinstance(got[name], tuple) else [got[name]]:
            assert tensor.device == input_device(patcher.model), name


# -- 1. dtypes --------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_bfloat16_models_score_and_train_in_float32(make):
    model = make()
    half = make().to(torch.bfloat16)
    tokenizer = CharTokenizer()
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(6))
    full_scores = scoring.answer_scores(Patcher(model), tokenizer, PAIRS, 1, vectors)
    half_scores = scoring.answer_scores(Patcher(half), tokenizer, PAIRS, 1, vectors)
    assert half_scores[1].dtype == torch.float32 and torch.allclose(half_scores[1], full_scores[1], atol=0.1)
    prompts = tokens.PromptSet(input_ids=[random.Random(i).sample(range(1, 120), 9) for i in range(2)], answer_ids=[5, 17])
    heads = fv.mean_head_outputs(Patcher(model), prompts, 0)
    assert fv.mean_head_outputs(Patcher(half), prompts, 0).dtype == torch.float32
    effects = fv.indirect_effects(Patcher(half), prompts, heads)
    assert effects.dtype == torch.float32 and torch.allclose(effects, fv.indirect_effects(Patcher(model), prompts, heads), atol=2e-3)
    # A learning rate of 1e-3 x the vector's RMS moves coordinates by less than bfloat16's
    # resolution: a vector kept in bfloat16 would not move; the float32 one does, as it does
    # with the float32 model.
    settings = TrainingSettings(n_pairs=6, steps=3, batch_size=3, learning_rate=1e-3)
    trained = train_function_vector(Patcher(half), tokenizer, PAIRS, 1, vectors[0].to(torch.bfloat16), settings)
    reference = train_function_vector(Patcher(model), tokenizer, PAIRS, 1, vectors[0].to(torch.bfloat16), settings)
    assert trained.vector.dtype == torch.float32
    assert (trained.vector != trained.initial_vector).float().mean() > 0.9
    step, reference_step = trained.vector - trained.initial_vector, reference.vector - reference.initial_vector
    assert torch.nn.functional.cosine_similarity(step, reference_step, dim=0) > 0.9


def test_jobs_run_in_bfloat16_and_store_float32_vectors(tmp_path):
    """extract, train, decode and the quality measurement on a tiny bfloat16 checkpoint."""
    from ffv_eval.evaluation.quality_gate import measure_quality
    from ffv_eval.vectors.jobs import decode_and_print, extract_and_save, train_and_save
    from ffv_eval.vectors.store import load_vector

    saved, path = _tiny_checkpoint(tmp_path)
    bf16, quiet = Placement("cpu", "bfloat16"), (lambda message: None)
    fv_path = extract_and_save(path, "antonym", out=str(tmp_path / "fv.safetensors"), placement=bf16, progress=quiet,
                               settings=fv.ExtractionSettings(n_mean_prompts=4, n_effect_prompts=2, top_k_choices=(2,)))
    ffv_path = train_and_save(path, "antonym", out=str(tmp_path / "ffv.safetensors"), start_from=str(fv_path), placement=bf16,
                              progress=quiet, settings=TrainingSettings(steps=3))
    for stored in (load_vector(fv_path), load_vector(ffv_path)):
        assert stored.vector.dtype == torch.float32 and stored.metadata["model_fingerprint"] == model_fingerprint(saved)
    assert not torch.equal(load_vector(fv_path).vector, load_vector(ffv_path).vector)
    decodings = decode_and_print([str(ffv_path)], path, k=20, placement=bf16, print_=quiet)
    assert len(decodings["ffv:antonym"].tokens) == 20
    figures = measure_quality(path, [ffv_path], placement=bf16)["vectors"]["ffv/antonym"]
    assert figures["decoding_hits"] == decodings["ffv:antonym"].n_hits


@pytest.mark.slow
def test_gemma_trains_in_bfloat16_from_the_float32_fv(tmp_path):
    from ffv_eval.vectors.jobs import train_and_save
    from ffv_eval.vectors.store import load_vector

    # the FV was made in float32; the bfloat16 model has the same fingerprint, so training starts from it
    out = train_and_save("gemma-3-270m", "antonym", out=str(tmp_path / "ffv.safetensors"), placement=Placement("cpu", "bfloat16"),
                         progress=lambda message: None, settings=TrainingSettings(steps=4))
    trained = load_vector(out)
    shipped = load_vector(VECTORS_DIR / "gemma-3-270m" / "fv" / "antonym.safetensors")
    assert trained.vector.dtype == torch.float32 and trained.metadata["model_fingerprint"] == shipped.metadata["model_fingerprint"]
    metrics = trained.metadata["metrics"]
    assert metrics["last_loss"] < metrics["first_loss"]
    assert metrics["validation_first_token_accuracy"] > metrics["validation_first_token_accuracy_at_init"]


@pytest.mark.slow
def test_gemma_quality_gate_passes_in_bfloat16_against_the_float32_baseline():
    from ffv_eval.reports.quality_baseline import compare_with_baseline, load_baseline
    from ffv_eval.evaluation.quality_gate import measure_quality

    baseline = load_baseline(VECTORS_DIR / "gemma-3-270m" / "quality-baseline.json")
    measured = measure_quality("gemma-3-270m", [VECTORS_DIR / "gemma-3-270m" / "ffv" / "antonym.safetensors"],
                               placement=Placement("cpu", "bfloat16"))
    report = compare_with_baseline(measured, baseline, required={"ffv/antonym"})
    assert report.passed, report.text()
    assert report.movements["ffv/antonym"][0] == 0.0
