"""The core capability on the real Gemma 3 270M (and SmolLM2-135M, a Llama-type model):
extraction, the patching mechanism, the lm-eval model and its bad inputs."""

import json
import random
import struct

import pytest
import torch
from lm_eval.api.instance import Instance

from ffv_eval.vectors import function_vectors as fv
from ffv_eval.vectors.jobs import extract_and_save
from ffv_eval.models.loading import model_fingerprint, resolve_pretrained
from ffv_eval.models.patching import Patcher
from ffv_eval.data.relations import load_relation
from ffv_eval.vectors.store import VectorFileError, VectorNameError, load_vector, save_vector

pytestmark = pytest.mark.slow
SMALL = fv.ExtractionSettings(n_mean_prompts=8, n_effect_prompts=3, layer=6, top_k_choices=(1, 3), scale_choices=(1.0, 2.0))


@pytest.fixture(scope="module")
def lm():
    from ffv_eval.harness.model import FFVPatchedLM

    return FFVPatchedLM(pretrained="gemma-3-270m", batch_size=16)


def _requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in args_list]


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_extract_saves_vector_metadata_and_heatmap(tmp_path, gemma):
    out = tmp_path / "antonym.safetensors"
    extract_and_save("gemma-3-270m", "antonym", out=str(out), settings=SMALL)
    stored = load_vector(out)
    meta = stored.metadata
    model, _ = gemma
    assert meta["model_fingerprint"] == model_fingerprint(model) and meta["hidden_size"] == 640
    assert meta["layer"] == 6 and meta["seed"] == 0 and meta["kind"] == "fv"
    assert meta["data"]["sha256"] == load_relation("antonym").sha256
    effects = [h["indirect_effect"] for h in meta["heads"]]
    assert effects == sorted(effects, reverse=True) and effects[0] > 0.01  # a head that carries the task
    metrics = meta["metrics"]
    assert metrics["validation_first_token_accuracy"] >= metrics["validation_zero_shot_first_token_accuracy"]
    width, height = _png_size(out.with_suffix(".png"))
    assert width > 200 and height > 200
    with pytest.raises(VectorFileError, match="exists; pass --force"):
        extract_and_save("gemma-3-270m", "antonym", out=str(out), settings=SMALL)


def test_cached_indirect_effects_match_one_forward_per_head(gemma):
    model, tok = gemma
    patcher = Patcher(model)
    rel = load_relation("antonym")
    rng = random.Random(0)
    clean = fv.encode_prompts(tok, *fv.icl_prompts(rel.train, 4, 10, rng, False))
    mean_heads = fv.mean_head_outputs(patcher, clean, fv.pad_id_of(tok))
    corrupted = fv.encode_prompts(tok, *fv.icl_prompts(rel.train, 1, 10, rng, True))
    fast = fv.indirect_effects(patcher, corrupted, mean_heads)
    slow = fv.indirect_effects_reference(patcher, corrupted, mean_heads)
    assert slow.abs().max() > 1e-3
    assert (fast - slow).abs().max() < 1e-4


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


def _reference_generations(gemma, inputs, layer=None, vector=None, max_new_tokens=8):
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


def _first_words_match(generation, target):
    """The relation tasks' exact match, written out: the generation's first words equal the
    target's, punctuation at word edges ignored."""
    import string

    words = lambda text, n: [w.strip(string.punctuation + "“”‘’«»") for w in text.split()[:n]]  # noqa: E731
    return words(generation, len(target.split())) == words(target, len(target.split()))


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
    patched = _reference_generations(gemma, [a for a, _ in pairs], info["patch_layer"], load_vector(info["path"]).vector)
    assert [s["filtered_resps"][0] for s in samples] == patched
    hits = [_first_words_match(g, b) for g, (_, b) in zip(patched, pairs)]
    assert out["results"]["relation_antonym"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))
    plain = [_first_words_match(g, b) for g, (_, b) in zip(_reference_generations(gemma, [a for a, _ in pairs]), pairs)]
    assert sum(hits) > sum(plain)  # the vector does the task the unpatched model does not


# -- bad input: each names the problem before any weights are loaded ------------------------
@pytest.fixture
def no_weights(monkeypatch):
    from lm_eval.models.huggingface import HFLM

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the bad input was caught")

    monkeypatch.setattr(HFLM, "__init__", refuse)


def _vector_file(tmp_path, size=640, layer=6, fingerprint="0" * 16, values=None):
    path = tmp_path / "v.safetensors"
    save_vector(path, torch.ones(size) if values is None else values, {"kind": "fv", "relation": "x", "model_fingerprint": fingerprint, "layer": layer}, force=True)
    return str(path)


def test_bad_vectors_fail_before_the_model_loads(tmp_path, no_weights):
    from ffv_eval.harness.model import FFVPatchedLM

    with pytest.raises(VectorFileError, match="hidden size 576, the model has 640"):
        FFVPatchedLM(pretrained="gemma-3-270m", vector=_vector_file(tmp_path, size=576))
    with pytest.raises(VectorFileError, match="layer 18 out of range: the model has layers 0..17"):
        FFVPatchedLM(pretrained="gemma-3-270m", vector=_vector_file(tmp_path), layer=18)
    with pytest.raises(VectorNameError, match="unknown vector name 'no-such-relation'"):
        FFVPatchedLM(pretrained="gemma-3-270m", vector="no-such-relation")
    path = _vector_file(tmp_path)
    from safetensors.torch import save_file

    save_file({"vector": torch.full((640,), float("nan"))}, path)
    with pytest.raises(VectorFileError, match="non-finite"):
        FFVPatchedLM(pretrained="gemma-3-270m", vector=path)


def test_vector_for_another_model_is_refused(tmp_path, lm):
    with pytest.raises(VectorFileError, match="made for model fingerprint 0000000000000000"):
        lm.set_vector(_vector_file(tmp_path))
    assert lm.stored_vector is None


def test_llama_type_model_extracts_and_refuses_gemma_vectors(tmp_path):
    from ffv_eval.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m")
    out = tmp_path / "smol.safetensors"
    extract_and_save("smollm2-135m", "antonym", out=str(out), settings=fv.ExtractionSettings(
        n_mean_prompts=4, n_effect_prompts=2, layer=8, top_k_choices=(3,), scale_choices=(1.0,)))
    meta = load_vector(out).metadata
    assert meta["hidden_size"] == 576 and meta["model_type"] == "llama" and meta["model_fingerprint"] == model_fingerprint(model)
    assert meta["heads"][0]["indirect_effect"] > 0
    from ffv_eval import VECTORS_DIR

    gemma_vector = load_vector(VECTORS_DIR / "gemma-3-270m" / "fv" / "antonym.safetensors")
    from ffv_eval.vectors.store import check_compatible

    with pytest.raises(VectorFileError, match="hidden size 640, the model has 576"):
        check_compatible(gemma_vector, 576, 30, model_fingerprint(model), None)


def _run(args, cwd, timeout=900):
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_stock_lm_eval_command_scores_with_a_shipped_vector(tmp_path):
    import shutil
    import sys

    lm_eval = shutil.which("lm_eval") or f"{sys.executable} -m lm_eval"
    proc = _run([*lm_eval.split(), "--model", "ffv-patched", "--model_args", "pretrained=gemma-3-270m,vector=antonym",
                 "--tasks", "relation_antonym", "--limit", "8", "--output_path", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["config"]["ffv_vector"]["relation"] == "antonym"
    assert results["config"]["ffv_vector"]["kind"] in ("fv", "ffv")
    assert "relation_antonym" in results["results"]


def test_ffv_cli_bad_input_exits_with_a_named_error_and_writes_nothing(tmp_path):
    import sys

    ffv = [sys.executable, "-m", "ffv_eval.cli"]
    out = tmp_path / "v.safetensors"
    for args, message in (
        (["--relation", "no-such"], "unknown relation 'no-such'"),
        (["--relation", "antonym", "--layer", "18"], "layer 18 out of range: the model has layers 0..17"),
        (["--relation", "antonym", "--data-dir", str(tmp_path)], "no file"),
    ):
        proc = _run([*ffv, "extract", "--model", "gemma-3-270m", "--out", str(out), *args], tmp_path, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "loading gemma-3-270m" not in proc.stdout  # refused before any model work
    assert list(tmp_path.iterdir()) == []


def test_main_job_compares_zero_shot_patched_and_few_shot(tmp_path, gemma):
    from scipy.stats import sem

    from ffv_eval.evaluation.compare import compare_conditions, format_table

    out = tmp_path / "comparison.json"
    report = compare_conditions("gemma-3-270m", ["antonym"], limit=6, batch_size=8, num_fewshot=3, output=str(out))
    row = report["relations"]["antonym"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    # each zero-shot condition against plain transformers on the same 6 test pairs (lm-eval's --limit)
    pairs = [(p.input, p.output) for p in load_relation("antonym").test[:6]]
    hits = {}
    for condition in ("zero_shot", "fv", "ffv", "ffv-random"):
        stored = load_vector(row["vectors"][condition]["path"]) if condition != "zero_shot" else None
        layer, vector = (stored.metadata["layer"], stored.vector) if stored else (None, None)
        generations = _reference_generations(gemma, [a for a, _ in pairs], layer, vector)
        hits[condition] = [float(_first_words_match(g, b)) for g, (_, b) in zip(generations, pairs)]
        assert row[condition]["exact_match"] == pytest.approx(sum(hits[condition]) / 6), condition
        assert row[condition]["stderr"] == pytest.approx(sem(hits[condition])), condition
    assert sum(hits["ffv"]) > sum(hits["zero_shot"])  # the shipped FFV does what the unpatched model does not
    p = row["3_shot"]["exact_match"]
    assert p * 6 == pytest.approx(round(p * 6)) and row["3_shot"]["stderr"] == pytest.approx((p * (1 - p) / 5) ** 0.5)
    assert row["vectors"]["fv"]["path"].endswith("fv/antonym.safetensors")
    assert "| antonym |" in format_table(report)
