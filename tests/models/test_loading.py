"""Loading and placing models (ffv_eval.models.loading): --device, --dtype and --device-map and
their errors, the placement handed to lm-eval, the checkpoint's dtype or the one asked for, and a
fingerprint that ignores dtype and device but tells checkpoints apart."""

import pytest
import torch

from ffv_eval import VECTORS_DIR
from ffv_eval.models.loading import Placement, PlacementError, input_device, load_model_and_tokenizer, model_fingerprint
from ffv_eval.models.tiny import tiny_llama
from tests.conftest import tiny_checkpoint


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
    from ffv_eval.evaluation.compare import compare_conditions
    from ffv_eval.harness import model as lm_model

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


def test_loading_follows_the_checkpoint_dtype_or_the_one_asked_for(tmp_path):
    saved, path = tiny_checkpoint(tmp_path)
    loaded = {}
    for dtype, expected in (("auto", torch.bfloat16), ("float32", torch.float32), ("float16", torch.float16)):
        model, tokenizer = load_model_and_tokenizer(path, device="cpu", dtype=dtype)
        assert model.dtype == expected and not model.training and not any(p.requires_grad for p in model.parameters())
        loaded[dtype] = model
    placed, _ = load_model_and_tokenizer(path, dtype="float32", device_map="auto")
    assert input_device(placed) == torch.device("cpu") and {p.device.type for p in placed.parameters()} == {"cpu"}
    prints = {model_fingerprint(m) for m in [saved, placed, *loaded.values()]}
    assert len(prints) == 1


# -- the fingerprint ------------------------------------------------------------------------
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
