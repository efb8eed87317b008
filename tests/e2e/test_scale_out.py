"""lm-eval's multi-process path (`accelerate launch ... -m lm_eval`) with 2 CPU processes gives the
same scores and the same per-sample results as one process."""

import json
import os
import subprocess
import sys

import pytest

TASKS = "relation_antonym,u2_analogy"


def _run(tmp_path, name, launcher, shared_data):
    out = tmp_path / name
    cmd = [*launcher, "-m", "lm_eval", "--model", "ffv-patched", "--model_args", "pretrained=gemma-3-270m,vector=antonym",
           "--tasks", TASKS, "--limit", "8", "--batch_size", "4", "--output_path", str(out), "--log_samples",
           "--metadata", json.dumps({"data_dir": str(shared_data)})]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            samples[(path.name.split("_20")[0], row["doc_id"])] = row["filtered_resps"]
    return results, samples, done.stderr


@pytest.mark.slow
def test_two_cpu_processes_score_like_one(tmp_path, shared_data):
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two, two_samples, log = _run(tmp_path, "two", accelerate, shared_data)
    assert "on rank 1" in log  # the second process took its share
    one, one_samples, _ = _run(tmp_path, "one", [sys.executable], shared_data)
    for task in TASKS.split(","):
        metric = "exact_match,none" if task.startswith("relation_") else "acc,none"
        assert two["results"][task][metric] == one["results"][task][metric]
    assert len(one_samples) == 16 and two_samples.keys() == one_samples.keys()
    for key, resps in one_samples.items():
        if key[0].startswith("samples_u2"):
            assert [float(r[0]) for r in two_samples[key]] == pytest.approx([float(r[0]) for r in resps], abs=1e-3)
        else:
            assert two_samples[key] == resps


def _requests():
    from lm_eval.api.instance import Instance

    ll = [Instance("loglikelihood", {}, (f"Q: {a}\nA:", f" {b}"), i) for i, (a, b) in enumerate([("hot", "cold"), ("big", "small"), ("up", "down")])]
    gen = [Instance("generate_until", {}, ("Q: early\nA:", {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}), 0)]
    return ll, gen


@pytest.mark.slow
def test_device_map_placement_with_disk_offload_scores_like_one_device(tmp_path):
    """parallelize=True places the model with accelerate's device_map="auto" under a memory bound:
    here the later blocks (including the patched one) are offloaded to disk, and the patched
    log-likelihoods and generations equal the model on one device."""
    from ffv_eval.harness.model import FFVPatchedLM

    ll, gen = _requests()
    args = dict(pretrained="gemma-3-270m", vector="antonym", layer=12, batch_size=4)
    whole = FFVPatchedLM(**args)
    expected_ll, expected_gen, fingerprint = whole.loglikelihood(ll), whole.generate_until(gen), whole.fingerprint
    plain = FFVPatchedLM(pretrained="gemma-3-270m", vector="none", batch_size=4).loglikelihood(ll)
    del whole
    placed = FFVPatchedLM(**args, parallelize=True, max_cpu_memory="900MB", offload_folder=str(tmp_path / "offload"))
    where = placed.model.hf_device_map
    assert where["model.layers.12"] == "disk" and where["model.embed_tokens"] == "cpu"
    assert placed.fingerprint == fingerprint  # read through accelerate's offload hooks
    got_ll = placed.loglikelihood(ll)
    assert [g for _, g in got_ll] == [g for _, g in expected_ll]
    assert [x for x, _ in got_ll] == pytest.approx([x for x, _ in expected_ll], abs=1e-4)
    assert [x for x, _ in got_ll] != pytest.approx([x for x, _ in plain], abs=1e-3)  # the vector acted
    assert placed.generate_until(gen) == expected_gen
