"""ffv-eval as a library installed next to other research code:

- the wheel, installed into a fresh virtual environment, serves stock `lm_eval` run from a
  directory outside the checkout and writes nothing into site-packages;
- jobs write under ./vectors of the working directory (or --out / --baseline), look names up
  there first, and refuse the installed package or a read-only place before any model work;
- two processes that fill a fresh cache at once wait for each other (file lock);
- a dependency outside the supported range, or a broken install, is one clear message, and
  stock lm-eval keeps working.

The wheel's environment reuses the installed dependencies (`venv --system-site-packages`), so
it is built in seconds, offline. The project's editable install is visible there too; its
.pth puts the checkout at the *end* of sys.path (site-packages entries come first, the venv's
before the system's), so the wheel's copy of ffv_eval wins, which the tests check.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import ffv_eval
from ffv_eval.files.atomic import UnwritableOutput, check_writable
from ffv_eval.dependency_versions import DependencyVersionError, version_problems
from ffv_eval.files.lock import CacheLockTimeout, cache_lock, owner_path

REPO = Path(__file__).resolve().parent.parent
MODEL = "gemma-3-270m"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FFV_EVAL_NO_AUTOLOAD", "FFV_EVAL_SKIP_VERSION_CHECK", "PYTHONPATH")}
    env.update(OFFLINE)
    env.update(extra)
    return env


def _run(args, cwd: Path, timeout: float = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the wheel in a fresh environment ---------------------------------------------------
@dataclass(frozen=True)
class Venv:
    python: Path
    site_packages: Path


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory) -> Venv:
    root = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "-w", root / "dist", REPO]
    if importlib.util.find_spec("hatchling") is None:  # the test extra has it; else pip fetches it once
        build.remove("--no-index")
    else:
        build.insert(4, "--no-build-isolation")
    _run(build, root)
    (wheel,) = (root / "dist").glob("ffv_eval-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root / "venv"], root)
    python = root / "venv" / "bin" / "python"
    # This interpreter's pip, run by the venv's python, installs into the venv. --ignore-installed:
    # the editable install of the same version is visible through the system site-packages.
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], root)
    site = _last_json(_run([python, "-c", "import json, sysconfig; print(json.dumps(sysconfig.get_path('purelib')))"], root))
    return Venv(python, Path(site))


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_wheel_serves_stock_lm_eval_outside_the_checkout(wheel_venv, tmp_path):
    package = wheel_venv.site_packages / "ffv_eval"
    where = _last_json(_run([wheel_venv.python, "-c", "import json, ffv_eval; print(json.dumps(ffv_eval.__file__))"], tmp_path))
    assert Path(where) == package / "__init__.py", "the venv must import the wheel's ffv_eval, not the checkout's"
    shipped = package / "_bundled" / "vectors" / MODEL / "ffv" / "antonym.safetensors"
    assert shipped.is_file() and (wheel_venv.site_packages / "_ffv_eval_autoload.pth").is_file()

    before = _listing(wheel_venv.site_packages)
    out = tmp_path / "results"
    _run([wheel_venv.python, "-m", "lm_eval", "--model", "ffv-patched",
          "--model_args", f"pretrained={MODEL},vector=antonym", "--tasks", "relation_antonym",
          "--limit", "4", "--batch_size", "4", "--output_path", out], tmp_path)
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert Path(results["config"]["ffv_vector"]["path"]) == shipped
    assert results["n-samples"]["relation_antonym"]["effective"] == 4
    assert _listing(wheel_venv.site_packages) == before, "lm_eval wrote into site-packages"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_installed_jobs_refuse_the_package_and_default_to_the_working_directory(wheel_venv, tmp_path):
    code = """
        import json
        from pathlib import Path
        import ffv_eval
        from ffv_eval.reports import quality_gate
        from ffv_eval.vectors import jobs as vector_jobs
        from ffv_eval.vectors.locations import output_path

        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded")
        vector_jobs.load_model_and_tokenizer = quality_gate.load_gate_model = no_model
        inside = ffv_eval.VECTORS_DIR / "gemma-3-270m" / "fv" / "mine.safetensors"
        errors = {}
        for name, job in {
            "extract": lambda: vector_jobs.extract_and_save("gemma-3-270m", "antonym", out=str(inside)),
            "update_baseline": lambda: quality_gate.run_check("gemma-3-270m", [], update=True),
            "baseline_inside": lambda: quality_gate.run_check("gemma-3-270m", [], update=True,
                                                              baseline_path=ffv_eval.VECTORS_DIR / "b.json"),
        }.items():
            try:
                job()
                errors[name] = None
            except ValueError as err:
                errors[name] = f"{type(err).__name__}: {err}"
        print(json.dumps({"errors": errors, "default": str(output_path("gemma-3-270m", "fv", "antonym")),
                          "baseline": str(quality_gate.default_baseline_path("gemma-3-270m"))}))
    """
    out = _last_json(_run([wheel_venv.python, "-c", textwrap.dedent(code)], tmp_path))
    package = wheel_venv.site_packages / "ffv_eval"
    inside = package / "_bundled" / "vectors" / MODEL / "fv" / "mine.safetensors"
    errors = out["errors"]
    assert errors["extract"].startswith(f"UnwritableOutput: {inside}: inside the installed ffv-eval package")
    assert "--out" in errors["extract"]
    local_baseline = tmp_path / "vectors" / MODEL / "quality-baseline.json"
    assert errors["update_baseline"] == (f"BaselineError: --update-baseline: no baseline file given and {local_baseline} "
                                         "does not exist; pass --baseline FILE (it is created if missing)")
    assert errors["baseline_inside"].startswith(f"UnwritableOutput: {package / '_bundled' / 'vectors' / 'b.json'}: inside")
    assert "--baseline" in errors["baseline_inside"]
    assert out["default"] == str(tmp_path / "vectors" / MODEL / "fv" / "antonym.safetensors")
    assert out["baseline"] == str(package / "_bundled" / "vectors" / MODEL / "quality-baseline.json")
    assert list(tmp_path.iterdir()) == []


# -- working-directory vectors (in this process) ----------------------------------------
def _copy_vector(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    shutil.copy(source.with_suffix(".json"), target.with_suffix(".json"))


def test_names_resolve_in_the_working_directory_first(tmp_path, monkeypatch):
    from ffv_eval.evaluation.quality_gate import default_baseline_path, shipped_vector_paths
    from ffv_eval.vectors.jobs import extract_and_save, train_and_save
    from ffv_eval.vectors.store import find_vectors, shipped_path

    monkeypatch.chdir(tmp_path)
    shipped_fv = ffv_eval.VECTORS_DIR / MODEL / "fv" / "antonym.safetensors"
    assert shipped_path(MODEL, "fv", "antonym") == shipped_fv
    assert default_baseline_path(MODEL) == ffv_eval.VECTORS_DIR / MODEL / "quality-baseline.json"

    local_fv = tmp_path / "vectors" / MODEL / "fv" / "antonym.safetensors"
    _copy_vector(shipped_fv, local_fv)  # a bare name prefers ffv, but ./vectors wins first
    local_baseline = tmp_path / "vectors" / MODEL / "quality-baseline.json"
    local_baseline.write_text("{}")
    assert shipped_path(MODEL, "fv", "antonym") == local_fv
    assert shipped_path(MODEL, "ffv", "antonym") == ffv_eval.VECTORS_DIR / MODEL / "ffv" / "antonym.safetensors"
    by_model = {v.path.parent.parent.name: v.path for v in find_vectors("antonym")}
    assert by_model[MODEL] == local_fv
    assert by_model["smollm2-135m"] == ffv_eval.VECTORS_DIR / "smollm2-135m" / "ffv" / "antonym.safetensors"
    assert default_baseline_path(MODEL) == local_baseline
    checked = shipped_vector_paths(MODEL, ("fv",))
    assert local_fv in checked and shipped_fv not in checked
    assert len(checked) == len(list((ffv_eval.VECTORS_DIR / MODEL / "fv").glob("*.safetensors")))

    # default outputs are ./vectors/<model>/<kind>/<relation>: existing ones are refused there,
    # before any model work
    with pytest.raises(ValueError, match=f"{local_fv} exists; pass --force"):
        extract_and_save(MODEL, "antonym")
    _copy_vector(shipped_fv, tmp_path / "vectors" / MODEL / "ffv" / "antonym.safetensors")
    with pytest.raises(ValueError, match=f"{tmp_path / 'vectors' / MODEL / 'ffv' / 'antonym.safetensors'} exists"):
        train_and_save(MODEL, "antonym")


def test_unwritable_outputs_are_refused_with_the_option_to_use(tmp_path):
    inside = Path(ffv_eval.__file__).resolve().parent / "vectors" / "x.safetensors"
    with pytest.raises(UnwritableOutput, match=r"inside the installed ffv-eval package .* pass --out"):
        check_writable(inside, "--out")
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UnwritableOutput, match=rf"{a_file / 'x.json'}: cannot write there \({a_file} is not a writable folder\); pass --baseline"):
        check_writable(a_file / "x.json", "--baseline")
    check_writable(tmp_path / "new" / "folder" / "x.safetensors", "--out")  # folders are made on write
    assert not (tmp_path / "new").exists()


# -- file locks -------------------------------------------------------------------------
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
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CONVERT)], cwd=tmp_path, env=_env(FFV_CACHE_DIR=str(cache)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
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


# -- dependency versions and a broken install -------------------------------------------
def test_version_problems_name_package_version_range_and_fix():
    requirements = ["torch>=2.4,<3", "lm-eval>=0.4.9,<0.5", "nnsight>=0.5,<0.9", "transformers>=5.0,<6",
                    "accelerate>=1.2,<2", "pytest>=7; extra == 'test'", "torch<1; extra == 'old'"]
    installed = {"torch": "2.13.0+cpu", "lm-eval": "0.4.13", "nnsight": "0.9.0rc1", "transformers": None, "accelerate": "0.1"}
    problems = version_problems(requirements, installed.get)
    assert problems == [
        "nnsight 0.9.0rc1 is installed, outside the supported range <0.9,>=0.5; fix: pip install 'nnsight<0.9,>=0.5'",
        "transformers is not installed; ffv-eval supports transformers<6,>=5.0; fix: pip install 'transformers<6,>=5.0'",
    ]
    assert version_problems(requirements, {**installed, "nnsight": "0.8.1", "transformers": "5.3.0.dev0"}.get) == []


def _fake_distribution(folder: Path, name: str, version: str) -> Path:
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


def test_a_dependency_out_of_range_is_a_clear_import_error(wheel_venv, tmp_path):
    shadow = _fake_distribution(tmp_path / "shadow", "nnsight", "0.4.0")
    proc = _run([wheel_venv.python, "-c", "import ffv_eval"], tmp_path, check=False, PYTHONPATH=str(shadow))
    assert proc.returncode == 1
    assert (f"{DependencyVersionError.__module__}.DependencyVersionError: ffv-eval {ffv_eval.__version__} cannot run with "
            "the installed packages: nnsight 0.4.0 is installed, outside the supported range <0.9,>=0.5; fix: pip install "
            "'nnsight<0.9,>=0.5' (or set FFV_EVAL_SKIP_VERSION_CHECK=1 to try anyway)") in proc.stderr
    _run([wheel_venv.python, "-c", "import ffv_eval"], tmp_path, PYTHONPATH=str(shadow), FFV_EVAL_SKIP_VERSION_CHECK="1")


_STOCK_LM_EVAL = (
    "import lm_eval.api.registry as r; from lm_eval.tasks import TaskManager;"
    "assert r.get_model('dummy').__name__ == 'DummyLM';"
    "assert 'ffv-patched' not in r.model_registry;"
    "tm = TaskManager(include_defaults=False, include_path={path!r});"
    "assert 'ffv_test_extra_task' in tm.all_tasks and 'relation_antonym' not in tm.all_tasks"
)


@pytest.mark.parametrize("breakage", ["version", "import"])
def test_a_broken_install_leaves_stock_lm_eval_working_with_one_warning(wheel_venv, tmp_path, breakage):
    if breakage == "version":
        shadow, why = _fake_distribution(tmp_path / "shadow", "nnsight", "0.4.0"), "nnsight 0.4.0 is installed"
    else:
        (tmp_path / "shadow" / "ffv_eval").mkdir(parents=True)
        (tmp_path / "shadow" / "ffv_eval" / "__init__.py").write_text("import a_missing_dependency_of_ffv_eval\n")
        shadow, why = tmp_path / "shadow", "No module named 'a_missing_dependency_of_ffv_eval'"
    extra = tmp_path / "extra_tasks"
    extra.mkdir()
    (extra / "extra.yaml").write_text("task: ffv_test_extra_task\ndataset_path: json\noutput_type: generate_until\n"
                                      "doc_to_text: '{{input}}'\ndoc_to_target: '{{output}}'\n")
    proc = _run([wheel_venv.python, "-c", _STOCK_LM_EVAL.format(path=str(extra))], tmp_path, PYTHONPATH=str(shadow))
    warnings = [line for line in proc.stderr.splitlines() if "ffv-eval" in line]
    assert len(warnings) == 1, proc.stderr
    assert warnings[0].startswith("WARNING: ffv-eval is installed but cannot be imported (")
    assert why in warnings[0] and "lm-eval's own models and tasks work" in warnings[0]
