"""Every job on any device and dtype, the package-wide rules, on tiny random models: tensors made
on the model's device (every torch factory call in the modules that feed the model names it, and
with torch's default device set to `meta` every result equals the plain run), and float32 where
precision needs it in bfloat16 models. The rest lives with its module: placement and the
fingerprint in tests/models/test_loading.py, answer tokens in tests/models/test_tokens.py,
bounded logits in tests/vectors/test_scoring.py, the jobs in bfloat16 in tests/vectors/test_jobs.py
and tests/evaluation/test_quality_gate.py, the command line's placement check in tests/test_cli.py."""

import ast
import random
from pathlib import Path

import pytest
import torch

from ffv_eval.models import tokens
from ffv_eval.models.loading import input_device
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tiny import tiny_gemma3, tiny_llama
from ffv_eval.vectors import function_vectors as fv
from ffv_eval.vectors import scoring
from ffv_eval.vectors.basis import Basis
from ffv_eval.vectors.composite import basis_logprobs
from ffv_eval.vectors.composite_fit import Analogy, MapSettings, completion_scores, fit_composite_map
from ffv_eval.vectors.decoding import decode_vector
from ffv_eval.vectors.fine_tuning import TrainingSettings, train_function_vector
from tests.conftest import PAIRS, CharTokenizer, same_values

REPO = Path(__file__).resolve().parent.parent


# -- 1. tensors on the model's device ----------------------------------------------------------
FACTORIES = {"tensor", "zeros", "ones", "full", "arange", "empty", "eye", "randn", "rand", "randint", "linspace"}
DEVICE_MODULES = ["vectors/function_vectors", "vectors/scoring", "models/tokens", "vectors/fine_tuning", "vectors/composite",
                  "vectors/composite_fit", "vectors/basis", "vectors/decoding", "evaluation/quality_gate", "evaluation/alignment",
                  "models/loading", "models/patching"]


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
        "top posterior": basis_logprobs(patcher, tokenizer, basis, [("ab", "ba"), ("cd", "dc")], with_baseline=True,
                                        top=scoring.TopRows(k=1, reference=2, candidates=5)),
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
        assert same_values(got[name], expected[name]), name
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
