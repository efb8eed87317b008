"""File locks (ffv_eval.files.lock): two processes that fill a fresh model cache at once convert
once, the other waits; a held lock is waited for, then times out naming the lock and its owner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from ffv_eval.files.lock import CacheLockTimeout, cache_lock, owner_path
from tests.conftest import offline_env

MODEL = "gemma-3-270m"


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


_CONVERT = """
    import json, os, sys, time
    from pathlib import Path
    from ffv_eval.models import loading as model_loading

    cache = Path(os.environ["FFV_CACHE_DIR"])
    def slow_fake_conversion(model, target):  # stands in for the one-minute GGUF conversion
        with open(cache / "conversions.txt", "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(2)
        staging = target.with_name(f".{target.name}-{os.getpid()}")
        staging.mkdir(parents=True)
        (staging / "config.json").write_text("{}")
        staging.rename(target)  # fails if another process got there first
    model_loading._convert_gguf = slow_fake_conversion

    (cache / f"ready-{os.getpid()}").touch()  # start together
    while len(list(cache.glob("ready-*"))) < 2:
        time.sleep(0.01)
    print(json.dumps({"path": model_loading.resolve_pretrained("gemma-3-270m"), "pid": os.getpid()}))
"""


def test_two_processes_filling_a_fresh_model_cache_convert_once(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CONVERT)], cwd=tmp_path, env=offline_env(FFV_CACHE_DIR=str(cache)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    results = [_last_json(subprocess.CompletedProcess([], 0, stdout, "")) for stdout, _ in outputs]
    target = cache / "models" / MODEL
    assert [r["path"] for r in results] == [str(target)] * 2
    converters = (cache / "conversions.txt").read_text().split()
    assert len(converters) == 1
    assert json.loads((target / "config.json").read_text()) == {}
    left = {p.name for p in (cache / "models").iterdir()} - {f"{MODEL}.lock"}  # the lock file may stay
    assert left == {MODEL}  # no owner file, no staging folder left
    waiter = next(stdout for (stdout, _), r in zip(outputs, results) if str(r["pid"]) != converters[0])
    lock = cache / "models" / f"{MODEL}.lock"
    assert waiter.count("[ffv] waiting") == 1
    assert f"for {lock}, held by pid {converters[0]} on host " in waiter and f"converting {MODEL}" in waiter
    assert f"delete {lock}" in waiter


_HOLD = """
    import sys, time
    from ffv_eval.files.lock import cache_lock
    with cache_lock(sys.argv[1], "holding it for a test"):
        print("held", flush=True)
        time.sleep(120)
"""


def test_a_held_lock_is_waited_for_then_times_out_naming_the_lock(tmp_path):
    lock = tmp_path / "cache" / "thing.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HOLD), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        messages = []
        t = time.perf_counter()
        with pytest.raises(CacheLockTimeout) as caught:
            with cache_lock(lock, "a test", timeout=0.5, report=messages.append):
                pytest.fail("acquired a lock that another process holds")
        assert time.perf_counter() - t >= 0.5
        assert len(messages) == 1 and f"held by pid {holder.pid} on host " in messages[0]
        assert str(caught.value).startswith(f"{lock} is still held after 0.5s by pid {holder.pid}")
        assert "FFV_LOCK_TIMEOUT" in str(caught.value)
    finally:
        holder.kill()
        holder.wait()
    # the OS frees the lock of a killed process: no stale lock to clear by hand
    with cache_lock(lock, "a test", timeout=5, report=messages.append):
        assert json.loads(owner_path(lock).read_text())["pid"] == os.getpid()
    assert not owner_path(lock).exists() and len(messages) == 1
