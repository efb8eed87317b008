"""The installed project (`pip install -e .` or a wheel) makes a stock lm-eval 0.4.13 see the
`ffv-patched` model type and the project's task folder with no extra flags, through
`_ffv_eval_autoload.pth`, and costs nothing to Python programs that do not import lm-eval.

Every check runs in a fresh interpreter (the hook acts at start-up), from a scratch directory
so that the installed project is tested, not the checkout in the current directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

PROJECT_TASK = "relation_antonym"  # defined in tasks/relations/
BUILTIN_TASK = "hellaswag"
HEAVY_MODULES = ("torch", "transformers", "nnsight", "lm_eval", "ffv_eval")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FFV_EVAL_NO_AUTOLOAD", None)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _python(code: str, cwd: Path, **env: str) -> dict:
    """Run `code` in a fresh interpreter; it must print one JSON document as its last line."""
    proc = _run([sys.executable, "-c", textwrap.dedent(code)], cwd, **env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _lm_eval_command() -> list[str]:
    """The `lm_eval` console script of this interpreter; where it has none (e.g. a venv using the
    system's site-packages), what that script runs, through this interpreter."""
    script = Path(sysconfig.get_path("scripts")) / "lm_eval"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from lm_eval.__main__ import cli_evaluate; sys.exit(cli_evaluate())"]


def test_plain_startup_imports_nothing_heavy(tmp_path):
    out = _python(
        f"""
        import sys, json
        print(json.dumps({{
            "heavy": sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules),
            "hook": "_ffv_eval_autoload" in sys.modules,
            "finder": any(type(f).__module__ == "_ffv_eval_autoload" for f in sys.meta_path),
        }}))
        """,
        tmp_path,
    )
    assert out["heavy"] == []
    assert out["hook"] and out["finder"], "_ffv_eval_autoload.pth is not installed in site-packages"


def test_registry_import_registers_model_lazily(tmp_path):
    out = _python(
        """
        import sys, json
        import lm_eval.api.registry as registry
        listed = "ffv-patched" in registry.model_registry
        lazy = "ffv_eval.harness.model" not in sys.modules and "torch" not in sys.modules
        finder_gone = not any(type(f).__module__ == "_ffv_eval_autoload" for f in sys.meta_path)
        from lm_eval.api.model import LM
        ours = registry.get_model("ffv-patched")
        hf = registry.get_model("hf")
        print(json.dumps({
            "listed": listed, "lazy": lazy, "finder_gone": finder_gone,
            "ours": f"{ours.__module__}:{ours.__name__}", "ours_is_lm": issubclass(ours, LM),
            "hf": hf.__name__, "dummy": registry.get_model("dummy").__name__,
            "builtins": len(registry.model_registry),
        }))
        """,
        tmp_path,
    )
    assert out["listed"]
    assert out["lazy"], "registering ffv-patched must not import ffv_eval.harness.model / torch"
    assert out["ours"] == "ffv_eval.harness.model:FFVPatchedLM" and out["ours_is_lm"]
    assert out["hf"] == "HFLM" and out["dummy"] == "DummyLM"
    assert out["builtins"] > 30  # lm-eval's own models are all still registered


@pytest.mark.slow  # indexes all of lm-eval's ~10k task files
def test_task_manager_sees_project_and_builtin_tasks(tmp_path):
    out = _python(
        f"""
        import json
        import ffv_eval
        from lm_eval.tasks import TaskManager
        tm = TaskManager()
        entry = tm.task_index.get({PROJECT_TASK!r})
        print(json.dumps({{
            "project": {PROJECT_TASK!r} in tm.all_tasks,
            "builtin": {BUILTIN_TASK!r} in tm.all_tasks,
            "yaml": str(entry.yaml_path) if entry else None,
            "tasks_dir": str(ffv_eval.TASKS_DIR.resolve()),
        }}))
        """,
        tmp_path,
    )
    assert out["project"] and out["builtin"]
    assert Path(out["yaml"]).resolve().is_relative_to(out["tasks_dir"])


def test_task_manager_include_path_forms(tmp_path):
    extra = tmp_path / "extra_tasks"
    extra.mkdir()
    (extra / "extra.yaml").write_text(
        "task: ffv_test_extra_task\ndataset_path: json\noutput_type: generate_until\n"
        "doc_to_text: '{{input}}'\ndoc_to_target: '{{output}}'\n"
    )
    out = _python(
        f"""
        import json
        from pathlib import Path
        import ffv_eval
        from lm_eval.tasks import TaskManager
        extra, ours = {str(extra)!r}, str(ffv_eval.TASKS_DIR)
        cases = {{
            "none": ((), {{}}),
            "positional_str": ((None, extra), {{}}),
            "keyword_path": ((), {{"include_path": Path(extra)}}),
            "keyword_list": ((), {{"include_path": [extra]}}),
            "tuple": ((), {{"include_path": (Path(extra),)}}),
            "already_ours": ((), {{"include_path": [ours + "/", extra]}}),
            "only_ours": ((), {{"include_path": Path(ours)}}),
        }}
        result = {{}}
        for name, (args, kwargs) in cases.items():
            tm = TaskManager(*args, include_defaults=False, **kwargs)
            inc = tm.include_path
            inc = [inc] if isinstance(inc, (str, Path)) else list(inc)
            result[name] = {{
                "project": {PROJECT_TASK!r} in tm.all_tasks,
                "extra": "ffv_test_extra_task" in tm.all_tasks,
                "ours_count": sum(Path(p).resolve() == Path(ours).resolve() for p in inc),
            }}
        print(json.dumps(result))
        """,
        tmp_path,
    )
    for name, case in out.items():
        assert case["project"], name
        assert case["ours_count"] == 1, name
        assert case["extra"] == (name not in ("none", "only_ours")), name


@pytest.mark.slow
def test_cli_lists_project_and_builtin_tasks(tmp_path):
    commands = {
        "python -m lm_eval": [sys.executable, "-m", "lm_eval", "ls", "tasks"],
        "lm_eval": [*_lm_eval_command(), "ls", "tasks"],
    }
    procs = {  # run both at once: each scans all of lm-eval's task YAMLs
        name: subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in commands.items()
    }
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} ls tasks failed:\n{stderr[-5000:]}"
        assert f"|{PROJECT_TASK} " in stdout, name
        assert f"|{BUILTIN_TASK} " in stdout, name


@pytest.mark.slow
def test_simple_evaluate_runs_a_project_task(tmp_path):
    out = _python(
        f"""
        import json
        import lm_eval
        results = lm_eval.simple_evaluate(model="dummy", tasks=[{PROJECT_TASK!r}], limit=2)
        print(json.dumps({{"samples": results["results"][{PROJECT_TASK!r}]["sample_len"]}}))
        """,
        tmp_path,
    )
    assert out["samples"] == 2


def test_broken_ffv_eval_warns_and_leaves_lm_eval_working(tmp_path):
    broken = tmp_path / "shadow" / "ffv_eval"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('simulated breakage')\n")
    proc = _run(
        [
            sys.executable,
            "-c",
            "import lm_eval.api.registry as r; from lm_eval.tasks import TaskManager;"
            "assert r.get_model('dummy').__name__ == 'DummyLM';"
            "assert 'ffv-patched' not in r.model_registry;"
            "TaskManager(include_defaults=False)",
        ],
        tmp_path,
        PYTHONPATH=str(broken.parent),
    )
    warnings = [line for line in proc.stderr.splitlines() if "ffv-eval" in line]
    assert len(warnings) == 1, proc.stderr  # one warning, though both hook steps were triggered
    assert warnings[0].startswith("WARNING: ffv-eval is installed but cannot be imported (ImportError: simulated breakage)")


def test_autoload_can_be_switched_off(tmp_path):
    out = _python(
        """
        import sys, json
        import lm_eval.api.registry as registry
        print(json.dumps({"hook": "_ffv_eval_autoload" in sys.modules,
                          "listed": "ffv-patched" in registry.model_registry}))
        """,
        tmp_path,
        FFV_EVAL_NO_AUTOLOAD="1",
    )
    assert out == {"hook": True, "listed": False}


@pytest.mark.parametrize("module", ["lm_eval.api.registry", "lm_eval.tasks.manager"])
def test_register_is_idempotent_after_the_hook(tmp_path, module):
    out = _python(
        f"""
        import json
        import {module}
        from ffv_eval.harness.plugin import register
        register(); register()
        from lm_eval.tasks import TaskManager
        import lm_eval.api.registry as registry
        print(json.dumps({{"listed": "ffv-patched" in registry.model_registry,
                          "wrapped": TaskManager.__init__._ffv_eval_wrapped,
                          "single_wrap": not getattr(TaskManager.__init__.__wrapped__, "_ffv_eval_wrapped", False)}}))
        """,
        tmp_path,
    )
    assert out == {"listed": True, "wrapped": True, "single_wrap": True}
