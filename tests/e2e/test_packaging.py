"""ffv-eval as a library installed next to other research code:

- the wheel, installed into a fresh virtual environment, serves stock `lm_eval` run from a
  directory outside the checkout and writes nothing into site-packages;
- jobs write under ./vectors of the working directory (or --out / --baseline), look names up
  there first, and refuse the installed package or a read-only place before any model work
  (in this process: tests/vectors/test_locations.py, tests/files/test_atomic.py);
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
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import ffv_eval
from ffv_eval.dependency_versions import DependencyVersionError
from tests.conftest import offline_env

REPO = Path(__file__).resolve().parent.parent.parent
MODEL = "gemma-3-270m"


def _run(args, cwd: Path, timeout: float = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=offline_env(**env), capture_output=True, text=True, timeout=timeout)
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


@pytest.mark.slow
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
        from ffv_eval.evaluation import quality_gate
        from ffv_eval.vectors import jobs as vector_jobs
        from ffv_eval.vectors.library import output_path

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


# -- dependency versions and a broken install -------------------------------------------
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
