"""bench/gpu_check.py, the prepared script for a CUDA machine, in its CPU form (--small): one
family's correctness checks (bfloat16 against float32) and the speed part on a shrunk model
pass and land in the JSON; a part that crashes is a FAIL and exit status 1, the other parts
still run; bad arguments are refused before any model is built."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402

TINY_RUN = ["--small", "--families", "gpt2", "--prompts", "1", "--loop-heads", "2", "--train-steps", "2", "--requests", "6",
            "--batch-size", "4"]


def test_small_run_passes_every_check_and_writes_its_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main([*TINY_RUN, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and report["settings"]["small"] and report["settings"]["requests"] == 6
    names = [(c["family"], c["name"]) for c in report["checks"]]
    assert names == [("gpt2", n) for n in ("mean heads", "indirect eff.", "scan vs loop", "FFV training", "patched LL",
                                           "patched gen.", "CFV")] + [("llama3-8b-shape", "hf parity"), ("llama3-8b-shape", "vector acts")]
    by_name = {c["name"]: c["figures"] for c in report["checks"]}
    # the lm-eval check could tell a patched model from an unpatched one
    assert by_name["patched LL"]["vector_effect_rel"] > 2 * gpu_check.TOLERANCES["ll_rel"]
    assert by_name["patched gen."]["agreement_with_unpatched"] < by_name["patched gen."]["agreement"]
    speed = report["figures"]["speed"]
    assert speed["model"]["layers"] == 4 and speed["model"]["vocab"] == 128256
    mediation = speed["mediation"]
    assert mediation["heads"] == 32 and mediation["loop_heads_timed"] == 2
    assert mediation["loop_extrapolated_s"] == pytest.approx(mediation["loop_s_per_forward"] * 33 * mediation["prompts"])
    assert speed["scoring"]["max_abs_ll_diff_no_vector"] == 0.0 and speed["training"]["steps"] == 2


def test_a_crashing_part_fails_the_run_and_the_others_still_report(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(gpu_check, "speed_training", broken)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main([*TINY_RUN, "--skip-correctness", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    failed = [c for c in report["checks"] if not c["passed"]]
    assert [(c["name"], c["detail"]) for c in failed] == [("training", "crashed: RuntimeError: simulated failure")]
    assert {"mediation", "scoring"} <= set(report["figures"]["speed"])  # scoring patched a random vector instead


@pytest.mark.parametrize("args, message", [
    (["--families", "gpt2,falcon"], "--families: unknown falcon"),
    (["--requests", "0"], "--requests must be at least 1"),
    (["--out", "/nonexistent/dir/x.json"], "folder /nonexistent/dir does not exist"),
])
def test_bad_arguments_are_refused_before_any_model_work(args, message, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "pair_tokenizer", lambda *a: pytest.fail("model work started"))
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--small", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_loop_on_a_subset_of_heads_equals_the_full_loop_there_and_leaves_the_rest_zero():
    """What the speed part times: indirect_effects_reference(heads=...) on a subset."""
    import random

    import torch

    from ffv_eval.models import tokens
    from ffv_eval.models.patching import Patcher
    from ffv_eval.models.tiny import tiny_llama
    from ffv_eval.vectors import function_vectors as fv

    patcher = Patcher(tiny_llama())
    prompts = tokens.PromptSet(input_ids=[random.Random(i).sample(range(1, 120), 9) for i in range(2)], answer_ids=[5, 17])
    heads = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    full = fv.indirect_effects_reference(patcher, prompts, heads, full_model=True)
    subset = [(0, 1), (2, 3), (1, 0)]
    part = fv.indirect_effects_reference(patcher, prompts, heads, full_model=True, heads=subset)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for layer, head in subset:
        mask[layer, head] = True
    assert torch.equal(part[:, mask], full[:, mask]) and full[:, mask].abs().min() > 0
    assert not part[:, ~mask].any()
