"""The stock `lm_eval` command and `ffv` as subprocesses, on the real Gemma 3 270M."""

import json

import pytest

pytestmark = pytest.mark.slow


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
