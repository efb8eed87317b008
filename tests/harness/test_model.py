"""`ffv-patched` (ffv_eval.harness.model) on the real Gemma 3 270M.

It is lm-eval's HFLM with a vector: without one it scores exactly as `--model hf`
(float32 and bfloat16, batch_size=auto, softmax_dtype, mixed_precision_dtype, the one-token
continuation cache, rolling log-likelihoods); with one, each log-likelihood row is patched at its
own position (checked against a forward hook on one request at a time), a generation gets the
vector once, at the prefill step, a float32 vector patches the bfloat16 model, and lm-eval's
response cache keeps differently patched runs apart. Also: scores that do not depend on the batch
size, the vector's record in lm-eval's results, bad vectors refused before any weights load,
vector=auto (ffv-patched's default) and vector=<kind>:* (each relation task its own vector)."""

import hashlib
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from ffv_eval import TASKS_DIR, VECTORS_DIR
from ffv_eval.data.relations import load_relation
from ffv_eval.models.loading import model_fingerprint, resolve_pretrained
from ffv_eval.models.patching import Patcher
from ffv_eval.vectors.store import VectorFileError, VectorNameError, load_vector, save_vector
from tests.conftest import first_words_match, reference_generations

pytestmark = pytest.mark.slow

LL = [  # one-token continuations that share a context (HFLM runs them as one row), and longer ones
    ("Q: hot\nA:", " cold"), ("Q: hot\nA:", " warm"), ("Q: big\nA:", " small and large"), ("Q: up\nA:", " down"),
    ("Q: early\nA:", " late"), ("Q: hot\nA: cold\n\nQ: wet\nA:", " dry"),
]
ROLLING = ["The quick brown fox jumps over the lazy dog, and then it runs far away into the dark green forest " * 3,
           "Paris is the capital of France."]


def _ll(requests, docs=None):
    """Instances; docs: (document, idx) per request (default: an empty document)."""
    docs = docs or [({}, 0)] * len(requests)
    return [Instance("loglikelihood", doc, args, idx) for args, (doc, idx) in zip(requests, docs)]


def _gen(contexts, **kwargs):
    return [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 6, **kwargs}), i) for i, c in enumerate(contexts)]


def _project_tasks(shared_data=None):
    """The project's tasks only (indexing lm-eval's ~10k task files would cost seconds per run)."""
    from lm_eval.tasks import TaskManager

    from ffv_eval import TASKS_DIR

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                       metadata={"data_dir": str(shared_data)} if shared_data else None)


def _scores(lm, shared_data):
    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=["u2_analogy"], limit=2, task_manager=_project_tasks(shared_data),
                                  log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    return {
        "u2": [s["resps"] for s in out["samples"]["u2_analogy"]],
        "acc": out["results"]["u2_analogy"]["acc,none"],
        "direct": lm.loglikelihood(_ll(LL)),
        "rolling": lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(ROLLING)]),
    }


@pytest.mark.parametrize("args", [
    "dtype=float32,batch_size=auto,max_batch_size=2,max_length=48,softmax_dtype=float32",
    "dtype=bfloat16,batch_size=auto,max_batch_size=2,max_length=48,softmax_dtype=float32",
    "dtype=float32,batch_size=3,max_length=48,mixed_precision_dtype=bfloat16",
])
def test_without_a_vector_ffv_patched_scores_exactly_as_hf(args, shared_data):
    from lm_eval.api.registry import get_model

    hf = get_model("hf").create_from_arg_string(f"pretrained={resolve_pretrained('gemma-3-270m')},device=cpu,{args}")
    expected = _scores(hf, shared_data)
    del hf
    ffv = get_model("ffv-patched").create_from_arg_string(f"pretrained=gemma-3-270m,vector=none,{args}")
    got = _scores(ffv, shared_data)
    assert str(ffv.model.dtype) == f"torch.{args.split(',')[0].removeprefix('dtype=')}"
    assert len(got["u2"]) == 2 and len(got["rolling"]) == 2
    assert got == expected  # bit for bit, every request type


def _vector_file(path, lm, vector, layer):
    save_vector(path, vector, {"kind": "fv", "relation": "test", "model_fingerprint": lm.fingerprint, "layer": layer})
    return str(path)


def _reference_loglikelihood(lm, context, continuation, vector, layer, position_in_continuation=0):
    """One request, full logits, the vector added by a plain forward hook after block `layer` at
    the position that predicts continuation token `position_in_continuation`."""
    ctx, cont = lm._encode_pair(context, continuation)
    ids = torch.tensor([ctx + cont[:-1]])
    position = len(ctx) - 1 + position_in_continuation

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0, position] += vector.to(hidden.dtype)

    handle = lm.model.model.layers[layer].register_forward_hook(add)
    try:
        with torch.no_grad():
            logits = lm.model(ids).logits[0, len(ctx) - 1:].float()
    finally:
        handle.remove()
    targets = torch.tensor(cont)
    return float(logits.log_softmax(-1).gather(1, targets[:, None]).sum()), bool((logits.argmax(-1) == targets).all())


def test_each_row_is_patched_at_its_own_position(tmp_path):
    """Right-padded batches mixing lengths, a shared one-token context, a multiple-choice analogy
    document (patched where D is predicted), and two requests whose rows HFLM would merge but
    whose patch positions differ: each equals the vector added to that request alone."""
    from ffv_eval.harness.model import FFVPatchedLM

    lm = FFVPatchedLM(pretrained="gemma-3-270m", vector="none", batch_size=4)
    torch.manual_seed(0)
    vector = torch.randn(lm.patcher.adapter.hidden_size) * 40
    lm.set_vector(_vector_file(tmp_path / "v.safetensors", lm, vector, 6))
    analogy = {"choices": [["tall", "short"], ["big", "little"]]}
    requests = LL + [
        ("Q: hot\nA:", " cold and"), ("Q: hot\nA: cold", " and"),  # the same row, split differently
        ("Q: hot\nA: cold\n\n", "Q: tall\nA: short"), ("Q: hot\nA: cold\n\n", "Q: big\nA: little"),
    ]
    docs = [({}, 0)] * (len(requests) - 2) + [(analogy, 0), (analogy, 1)]
    got = lm.loglikelihood(_ll(requests, docs))
    offsets = [0] * (len(requests) - 2) + [
        lm._answer_offset(args, *lm._encode_pair(*args), d) for args, d in zip(requests[-2:], ("short", "little"))]
    expected = [_reference_loglikelihood(lm, c, x, vector, 6, o) for (c, x), o in zip(requests, offsets)]
    assert min(offsets[-2:]) > 0
    assert [g for _, g in got] == [g for _, g in expected]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], abs=2e-4)
    # had the two requests with one row been run as one, the second would be patched one token early
    merged = _reference_loglikelihood(lm, *requests[len(LL) + 1], vector, 6, -1)
    assert abs(merged[0] - got[len(LL) + 1][0]) > 1e-3
    lm.set_vector(None)
    plain = lm.loglikelihood(_ll(requests))
    assert min(abs(p - s) for (p, _), (s, _) in zip(plain, got)) > 1e-3  # the vector acted on every request


def test_generation_adds_the_vector_once_at_the_last_prompt_token(tmp_path):
    """A marker vector (1e6 in one coordinate) shows where it was added: counted at the input of
    the next block over every forward pass of a multi-token generation of two left-padded prompts."""
    from ffv_eval.harness.model import FFVPatchedLM

    lm = FFVPatchedLM(pretrained="gemma-3-270m", vector="none", batch_size=2)
    layer, hidden = 8, lm.patcher.adapter.hidden_size
    marker = torch.zeros(hidden)
    marker[3] = 1e6
    seen = []

    def count(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen.append((h.shape[1], (h[..., 3].abs() > 5e5).nonzero().tolist()))

    handle = lm.model.model.layers[layer + 1].register_forward_pre_hook(count, with_kwargs=True)
    try:
        requests = _gen(["Q: hot\nA:", "Q: a long question about the weather\nA:"], until=["never"])
        lm.generate_until(requests)
        unpatched, seen[:] = list(seen), []
        lm.set_vector(_vector_file(tmp_path / "marker.safetensors", lm, marker, layer))
        lm.generate_until(requests)
    finally:
        handle.remove()
    assert all(not hits for _, hits in unpatched)
    (prompt_length, hits), *steps = seen
    assert len(steps) >= 2  # after the prefill step, one-token steps
    assert hits == [[0, prompt_length - 1], [1, prompt_length - 1]]  # each row once, at its last prompt token
    assert all(width == 1 and not step_hits for width, step_hits in steps)


class _StemVectors:
    """A stand-in for CompositeVectors: a fixed vector per source pair."""

    def __init__(self, vectors, layer):
        self.vectors, self.layer, self.prepared = vectors, layer, []

    def prepare(self, stems, where=None):
        self.prepared.append(list(stems))

    def vector(self, a, b):
        return self.vectors[(a, b)]


def test_composite_generation_batches_source_pairs_and_patches_each_row_with_its_own(monkeypatch):
    """vector=cfv generation runs HFLM's batches across source pairs (was: one generate call per
    pair), each row with its own pair's vector: the same texts as each request alone with its
    vector; the same prompt under two vectors goes to a second round."""
    from ffv_eval.harness.model import FFVPatchedLM

    lm = FFVPatchedLM(pretrained="gemma-3-270m", vector="none", batch_size=4)
    hidden, layer = lm.patcher.adapter.hidden_size, 6
    g = torch.Generator().manual_seed(0)
    stems = [("hot", "cold"), ("big", "small"), ("up", "down")]
    vectors = {stem: torch.randn(hidden, generator=g) * 40 for stem in stems}
    docs = [stems[0], stems[1], stems[2], stems[0], stems[1], stems[1]]
    contexts = [f"Q: {a}\nA: {b}\n\nQ: {c}\nA:" for (a, b), c in zip(docs, ["tall", "wet", "in", "fast", "old", "old"])]
    contexts[5] = contexts[2]  # one prompt, two source pairs (another pair's vector)
    requests = [Instance("generate_until", {"a": a, "b": b}, (c, {"until": ["\n"], "max_gen_toks": 5}), i)
                for i, ((a, b), c) in enumerate(zip(docs, contexts))]
    plain = lm.generate_until(requests)
    calls = []
    original = FFVPatchedLM._model_generate
    monkeypatch.setattr(FFVPatchedLM, "_model_generate",
                        lambda self, context, *a, **k: calls.append(context.shape[0]) or original(self, context, *a, **k))
    lm.composite, lm.patch_layer, lm.patch_scale = _StemVectors(vectors, layer), layer, 1.0
    try:
        batched = lm._generate_planned(requests)  # (generate_until would first check the vectors' training data)
    finally:
        lm.composite = None
    assert sorted(calls) == [1, 1, 4]  # round one: five requests in batches of 4; round two: the repeated prompt
    alone = []
    for request, stem in zip(requests, docs):
        lm.patch_vector, lm.patch_layer = vectors[stem], layer
        alone += lm.generate_until([request])
    lm.patch_vector = lm.patch_layer = None
    assert batched == alone
    assert sum(b != p for b, p in zip(batched, plain)) >= 3  # the vectors changed the texts


def test_generation_keeps_hflm_sampling_and_stopping(tmp_path):
    """A zero vector goes through the patched path and must change nothing: greedy and sampled
    generations (same seed), with stop sequences, equal `--model hf`."""
    from lm_eval.models.huggingface import HFLM

    from ffv_eval.harness.model import FFVPatchedLM

    contexts = ["Q: hot\nA:", "The capital of France is", "Q: tall\nA: short\n\nQ: up\nA:"]
    greedy, sampled = _gen(contexts, until=["\n", "."]), _gen(contexts, do_sample=True, temperature=0.9, max_gen_toks=8)

    def run(lm):
        torch.manual_seed(0)
        return lm.generate_until(greedy), lm.generate_until(sampled)

    hf = HFLM(pretrained=resolve_pretrained("gemma-3-270m"), device="cpu", batch_size=3)
    expected = run(hf)
    del hf
    lm = FFVPatchedLM(pretrained="gemma-3-270m", vector="none", batch_size=3)
    lm.set_vector(_vector_file(tmp_path / "zero.safetensors", lm, torch.zeros(lm.patcher.adapter.hidden_size), 6))
    assert run(lm) == expected


def _relation_run(model_args, limit=12):
    import lm_eval

    out = lm_eval.simple_evaluate(model="ffv-patched", model_args=model_args, tasks=["relation_antonym"], limit=limit,
                                  task_manager=_project_tasks(), log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["relation_antonym"], key=lambda s: s["doc_id"])
    return out["results"]["relation_antonym"]["exact_match,none"], [s["filtered_resps"][0].strip() for s in samples], out


def test_a_float32_vector_patches_the_bfloat16_model_inside_stock_lm_eval():
    """The shipped (float32) antonym vector, through lm_eval.simple_evaluate with dtype=bfloat16,
    moves the answers as it does in float32: most bfloat16 answers equal the float32 ones, and
    few equal the unpatched bfloat16 answers."""
    acc16, patched16, out = _relation_run("pretrained=gemma-3-270m,vector=antonym,dtype=bfloat16")
    acc32, patched32, _ = _relation_run("pretrained=gemma-3-270m,vector=antonym,dtype=float32")
    acc_plain, plain16, _ = _relation_run("pretrained=gemma-3-270m,vector=none,dtype=bfloat16")
    assert out["config"]["ffv_vector"]["relation"] == "antonym"
    assert out["config"]["model_dtype"] == "torch.bfloat16"
    same_as_float32 = sum(a == b for a, b in zip(patched16, patched32))
    same_as_plain = sum(a == b for a, b in zip(patched16, plain16))
    assert same_as_float32 >= 9 and same_as_plain <= 3, (patched16, patched32, plain16)
    assert acc16 >= acc_plain + 0.4 and abs(acc16 - acc32) <= 0.25


def test_the_response_cache_keeps_differently_patched_runs_apart(tmp_path):
    """lm_eval.simple_evaluate(use_cache=...) keys responses on the request text alone; runs with
    another vector (or none, another scale, another layer) compute their own answers, and a
    rerun with the same vector reads them back without running the model."""
    import lm_eval

    from ffv_eval import VECTORS_DIR
    from ffv_eval.harness.model import FFVPatchedLM

    lm = FFVPatchedLM(pretrained="gemma-3-270m", vector="none", batch_size=4)
    shipped = load_vector(VECTORS_DIR / "gemma-3-270m" / "ffv" / "antonym.safetensors")
    antonym = _vector_file(tmp_path / "antonym.safetensors", lm, shipped.vector, shipped.metadata["layer"])
    calls = []
    generate = lm._model_generate
    lm._model_generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    cache = str(tmp_path / "cache" / "responses")

    def run(vector=None, **how):
        lm.set_vector(vector, **how)
        calls.clear()
        out = lm_eval.simple_evaluate(model=lm, tasks=["relation_antonym"], limit=6, use_cache=cache, log_samples=True,
                                      task_manager=_project_tasks(), bootstrap_iters=0)
        return [s["filtered_resps"][0] for s in sorted(out["samples"]["relation_antonym"], key=lambda s: s["doc_id"])], len(calls)

    patched, patched_calls = run(antonym)
    plain, plain_calls = run(None)
    assert patched_calls > 0 and plain_calls > 0 and patched != plain
    again, again_calls = run(antonym)
    assert again == patched and again_calls == 0  # read back from the cache
    assert run(None) == (plain, 0)
    for how in ({"scale": 2.0}, {"layer": 8}):
        other, other_calls = run(antonym, **how)
        assert other_calls > 0, how
    assert run(antonym, scale=2.0)[1] == 0


def test_config_is_read_with_the_hub_arguments_before_the_weights(tmp_path, monkeypatch):
    """revision, trust_remote_code, token, subfolder reach the early config read that checks the
    vector (before HFLM loads anything)."""
    from lm_eval.models.huggingface import HFLM

    import ffv_eval.harness.model as lm_model

    seen = {}
    real = lm_model.text_config

    def text_config(name, **kwargs):
        seen.update(kwargs)
        return real(name)

    class Stop(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(lm_model, "text_config", text_config)
    monkeypatch.setattr(HFLM, "__init__", refuse)
    path = tmp_path / "v.safetensors"
    save_vector(path, torch.ones(640), {"kind": "fv", "relation": "x", "model_fingerprint": "0" * 16, "layer": 3})
    with pytest.raises(Stop):
        lm_model.FFVPatchedLM(pretrained="gemma-3-270m", vector=str(path), revision="v1", trust_remote_code=True,
                              token="hf_x", subfolder="")
    assert seen == {"revision": "v1", "trust_remote_code": True, "token": "hf_x"}


# -- patched scoring and generation, the vector's record ---------------------------------------
@pytest.fixture(scope="module")
def lm():
    from ffv_eval.harness.model import FFVPatchedLM

    return FFVPatchedLM(pretrained="gemma-3-270m", batch_size=16)


def _requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in args_list]


def test_unembedding_direction_vector_emits_its_token_only_where_patched(tmp_path, gemma, lm):
    model, tok = gemma
    token = tok(" banana", add_special_tokens=False).input_ids[0]
    direction = model.lm_head.weight[token].float()
    vector = direction / direction.norm() * 200_000  # dominates the last block's residual (~36k)
    path = tmp_path / "banana.safetensors"
    save_vector(path, vector, {"kind": "fv", "relation": "banana", "model_fingerprint": model_fingerprint(model), "layer": 17})

    context = "Q: hot\nA:"
    ids = tok(context, return_tensors="pt").input_ids
    patcher = Patcher(model)
    last = ids.shape[1] - 1
    patched = patcher.adapter.unembed(patcher.final_hidden(ids, layer=17, vector=vector, positions=torch.tensor([last])))
    plain = model(ids).logits
    assert patched[0, last].argmax() == token and plain[0, last].argmax() != token
    assert torch.allclose(patched[0, :last], plain[0, :last], atol=1e-3)  # nothing else moves

    lm.set_vector(str(path))
    try:
        (logprob, greedy), = lm.loglikelihood(_requests("loglikelihood", [(context, " banana")]))
        generated, = lm.generate_until(_requests("generate_until", [(context, {"until": ["\n"], "max_gen_toks": 4})]))
    finally:
        lm.set_vector(None)
    (plain_logprob, plain_greedy), = lm.loglikelihood(_requests("loglikelihood", [(context, " banana")]))
    assert greedy and not plain_greedy and logprob > plain_logprob + 10
    assert generated.split()[0] == "banana"
    assert lm.get_model_info()["ffv_vector"] is None


def _ll_requests(n=16):
    rel = load_relation("antonym")
    return [(f"Q: {p.input}\nA:", f" {p.output}") for p in rel.test[:n]] + [("Q: big\nA:", " small and large")]


def test_scores_do_not_depend_on_batch_size(lm):
    lm.set_vector("antonym")
    try:
        results = {}
        for bs in (1, 16):
            lm.batch_size_per_gpu = bs
            results[bs] = lm.loglikelihood(_requests("loglikelihood", _ll_requests()))
            gen = [(f"Q: {p.input}\nA:", {"until": ["\n"], "max_gen_toks": 6}) for p in load_relation("antonym").test[:16]]
            results[f"gen{bs}"] = lm.generate_until(_requests("generate_until", gen))
    finally:
        lm.batch_size_per_gpu = 16
        lm.set_vector(None)
    for (a, ga), (b, gb) in zip(results[1], results[16]):
        assert abs(a - b) < 1e-3 and ga == gb
    assert results["gen1"] == results["gen16"]


def test_without_a_vector_scores_equal_stock_hf(lm):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=resolve_pretrained("gemma-3-270m"), batch_size=16, device="cpu")
    requests = _ll_requests()
    ours = lm.loglikelihood(_requests("loglikelihood", requests))
    theirs = hf.loglikelihood(_requests("loglikelihood", requests))
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert abs(a - b) < 1e-4 and ga == gb
    gen = [(c, {"until": ["\n"], "max_gen_toks": 6}) for c, _ in requests]
    assert lm.generate_until(_requests("generate_until", gen)) == hf.generate_until(_requests("generate_until", gen))


def test_patched_lm_eval_run_records_the_vector(lm, gemma):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ffv_eval import TASKS_DIR

    lm.set_vector("antonym")
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=["relation_antonym"], limit=8, log_samples=True,
                                      task_manager=TaskManager(include_path=str(TASKS_DIR)))
    finally:
        lm.set_vector(None)
    info = out["config"]["ffv_vector"]
    assert info["relation"] == "antonym" and info["patch_layer"] == info["layer"]
    # against plain transformers: greedy generation with the vector added by a torch forward hook
    samples = sorted(out["samples"]["relation_antonym"], key=lambda s: s["doc_id"])
    pairs = [(s["doc"]["input"], s["doc"]["output"]) for s in samples]
    patched = reference_generations(gemma, [a for a, _ in pairs], info["patch_layer"], load_vector(info["path"]).vector)
    assert [s["filtered_resps"][0] for s in samples] == patched
    hits = [first_words_match(g, b) for g, (_, b) in zip(patched, pairs)]
    assert out["results"]["relation_antonym"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))
    plain = [first_words_match(g, b) for g, (_, b) in zip(reference_generations(gemma, [a for a, _ in pairs]), pairs)]
    assert sum(hits) > sum(plain)  # the vector does the task the unpatched model does not


# -- bad input: each names the problem before any weights are loaded ------------------------
@pytest.fixture
def no_weights(monkeypatch):
    from lm_eval.models.huggingface import HFLM

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the bad input was caught")

    monkeypatch.setattr(HFLM, "__init__", refuse)


def _vector_file_of_another_model(tmp_path, size=640, layer=6, fingerprint="0" * 16, values=None):
    path = tmp_path / "v.safetensors"
    save_vector(path, torch.ones(size) if values is None else values,
                {"kind": "fv", "relation": "x", "model_fingerprint": fingerprint, "layer": layer}, force=True)
    return str(path)


def test_bad_vectors_fail_before_the_model_loads(tmp_path, no_weights):
    from ffv_eval.harness.model import FFVPatchedLM

    with pytest.raises(VectorFileError, match="hidden size 576, the model has 640"):
        FFVPatchedLM(pretrained="gemma-3-270m", vector=_vector_file_of_another_model(tmp_path, size=576))
    with pytest.raises(VectorFileError, match="layer 18 out of range: the model has layers 0..17"):
        FFVPatchedLM(pretrained="gemma-3-270m", vector=_vector_file_of_another_model(tmp_path), layer=18)
    with pytest.raises(VectorNameError, match="unknown vector name 'no-such-relation'"):
        FFVPatchedLM(pretrained="gemma-3-270m", vector="no-such-relation")
    path = _vector_file_of_another_model(tmp_path)
    from safetensors.torch import save_file

    save_file({"vector": torch.full((640,), float("nan"))}, path)
    with pytest.raises(VectorFileError, match="non-finite"):
        FFVPatchedLM(pretrained="gemma-3-270m", vector=path)


def test_vector_for_another_model_is_refused(tmp_path, lm):
    with pytest.raises(VectorFileError, match="made for model fingerprint 0000000000000000"):
        lm.set_vector(_vector_file_of_another_model(tmp_path))
    assert lm.stored_vector is None


# -- vector=auto ---------------------------------------------------------------------------------
def _instance(task, doc, idx=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc=doc, arguments=("Q: x\nA:", " y"), idx=idx,
                    metadata=(task, 0, 1))


@pytest.fixture(scope="module")
def auto_lm():
    from ffv_eval.harness.model import FFVPatchedLM

    return FFVPatchedLM(pretrained="gemma-3-270m", batch_size=8)  # no vector=: the default, auto


@pytest.mark.slow
def test_auto_refuses_a_task_without_a_vector_of_its_own(auto_lm):
    from ffv_eval.harness.model import VectorTaskMismatch

    with pytest.raises(VectorTaskMismatch, match=r"vector=auto: task hellaswag .*vector=none"):
        auto_lm.loglikelihood([_instance("hellaswag", {"ctx": "x"})])


@pytest.mark.slow
def test_lm_eval_without_model_args_patches_each_task_with_its_own_vector(auto_lm, shared_data):
    """`lm_eval --model ffv-patched --tasks u2_analogy` with no model_args: a CFV per question
    (recorded per task in the results), log-likelihoods unlike vector=none's; relation_<name>
    gets that relation's shipped FFV."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": str(shared_data)})

    def run(model, model_args=None):
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["u2_analogy", "relation_antonym"], limit=3,
                                       task_manager=tm, log_samples=True, bootstrap_iters=0)

    auto = run("ffv-patched")  # through lm-eval's registry, as the command line does: no model_args at all
    per_task = auto["config"]["ffv_vector"]["per_task"]
    assert auto["config"]["ffv_vector"]["kind"] == "auto"
    assert per_task["u2_analogy"]["kind"] == "cfv" and Path(per_task["u2_analogy"]["path"]) == VECTORS_DIR / "gemma-3-270m" / "basis"
    assert Path(per_task["relation_antonym"]["path"]) == VECTORS_DIR / "gemma-3-270m" / "ffv" / "antonym.safetensors"
    plain = run("ffv-patched", "vector=none")
    assert plain["config"]["ffv_vector"] is None

    def lls(out, task):
        return [r[0][0] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"]) for r in s["resps"]]

    n = 5  # U2: five choices, then each choice's C part (unpatched: the vector would come after it)
    auto_u2, plain_u2 = lls(auto, "u2_analogy"), lls(plain, "u2_analogy")
    patched = 0
    for q in range(3):
        whole = slice(2 * n * q, 2 * n * q + n)
        c_part = slice(2 * n * q + n, 2 * n * (q + 1))
        moved = max(abs(x - y) for x, y in zip(auto_u2[whole], plain_u2[whole]))
        # the shipped map's no-relation option may leave a question without a vector: then nothing moves
        assert moved > 0.05 or moved < 1e-4, q
        patched += moved > 0.05
        assert auto_u2[c_part] == pytest.approx(plain_u2[c_part], abs=1e-4), q  # float32 rounding of other batch shapes
    assert patched >= 1
    def generations(out):
        return [s["resps"][0][0] for s in sorted(out["samples"]["relation_antonym"], key=lambda s: s["doc_id"])]

    assert generations(auto) != generations(plain)
    assert auto["results"]["relation_antonym"]["exact_match,none"] > plain["results"]["relation_antonym"]["exact_match,none"]


# -- vector=<kind>:*: one run patches each relation task with its own vector --------------------
@pytest.mark.slow
def test_per_task_vectors_equal_one_run_per_vector():
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ffv_eval import TASKS_DIR
    from ffv_eval.harness.model import FFVPatchedLM, VectorTaskMismatch
    from ffv_eval.vectors.spec import VectorNameError, VectorSpec

    tasks = ["relation_antonym", "relation_english-french"]
    lm = FFVPatchedLM(pretrained="gemma-3-270m", vector="ffv:*", batch_size=8)
    project_tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)  # not lm-eval's ~10k task files

    def run(task_list):
        out = lm_eval.simple_evaluate(model=lm, tasks=task_list, limit=6, log_samples=True, random_seed=0, task_manager=project_tasks,
                                      numpy_random_seed=0, torch_random_seed=0)
        return out, {t: [s["filtered_resps"] for s in out["samples"][t]] for t in task_list}

    together, generations = run(tasks)
    used = together["config"]["ffv_vector"]["per_task"]
    assert set(used) == set(tasks) and used["relation_antonym"]["path"].endswith("ffv/antonym.safetensors")
    for task in tasks:  # the file each task was patched with, by content (what leaderboard --run compares)
        assert used[task]["sha256"] == hashlib.sha256(Path(used[task]["path"]).read_bytes()).hexdigest()
    for task in tasks:
        lm.set_vector(f"ffv:{task.removeprefix('relation_')}")
        alone, alone_generations = run([task])
        assert alone_generations[task] == generations[task]
        assert alone["results"][task]["exact_match,none"] == together["results"][task]["exact_match,none"]
    lm.set_vector(None)
    lm.per_task = VectorSpec.parse("ffv:*")
    with pytest.raises(VectorTaskMismatch, match="u2_analogy is not one"):
        lm._per_task([type("R", (), {"task_name": "u2_analogy", "doc": {}})()], lambda group: group)
    with pytest.raises(VectorNameError, match="unknown kind 'nope'"):
        FFVPatchedLM(pretrained="gemma-3-270m", vector="nope:*")
