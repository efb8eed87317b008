"""The project's errors: every error class is an FFVError; `ffv` turns those (bad input) into one
line and exit status 2, and lets every other exception (a bug) through with its traceback."""

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import ffv_eval
from ffv_eval import cli
from ffv_eval.errors import FFVError

PACKAGE_DIR = Path(ffv_eval.__file__).resolve().parent


def _modules():
    for info in pkgutil.walk_packages(ffv_eval.__path__, "ffv_eval."):
        if not info.name.startswith("ffv_eval._bundled"):
            yield importlib.import_module(info.name)


def test_every_error_class_of_the_project_is_an_ffv_error():
    errors = {f"{module.__name__}.{name}": cls for module in _modules()
              for name, cls in inspect.getmembers(module, inspect.isclass)
              if issubclass(cls, BaseException) and cls.__module__ == module.__name__}
    assert {"ffv_eval.data.relations.RelationDataError", "ffv_eval.vectors.store.VectorFileError",
            "ffv_eval.vectors.spec.VectorNameError", "ffv_eval.files.lock.CacheLockTimeout",
            "ffv_eval.dependency_versions.DependencyVersionError"} <= set(errors)
    assert [name for name, cls in errors.items() if not issubclass(cls, FFVError)] == []


def test_no_assert_checks_data_in_the_package():
    asserts = [f"{path.relative_to(PACKAGE_DIR)}:{node.lineno}" for path in sorted(PACKAGE_DIR.rglob("*.py"))
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.Assert)]
    assert asserts == []


def test_bad_input_is_one_line_and_exit_status_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "ffv_eval.cli", "compose", "--pair", "France-Paris", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == "ffv: error: --pair 'France-Paris': expected a:b\n"


def test_a_missing_input_file_is_a_named_error(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert cli.main(["train", "--relation", "antonym", "--pairs", str(missing), "--out", str(tmp_path / "v.safetensors"),
                     "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"ffv: error: {missing}: cannot read the file (No such file or directory)\n"
    assert sorted(tmp_path.iterdir()) == []


def test_a_model_that_cannot_be_found_is_a_named_error(tmp_path):
    from ffv_eval.models.loading import ModelNotFound, text_config

    with pytest.raises(ModelNotFound, match=f"model '{tmp_path}': no config to read"):
        text_config(str(tmp_path))


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), KeyError("layer"), ValueError("a bug")])
def test_any_other_exception_is_a_bug_and_keeps_its_traceback(bug, monkeypatch, capsys):
    def broken(args):
        raise bug

    monkeypatch.setattr(cli, "_decode", broken)
    with pytest.raises(type(bug)) as caught:
        cli.main(["decode", "antonym"])
    assert caught.value is bug and caught.value.__traceback__ is not None
    assert "ffv: error" not in capsys.readouterr().err


def test_a_project_error_from_any_command_is_reported_not_raised(monkeypatch, capsys):
    from ffv_eval.vectors.fine_tuning import DivergedTraining

    def diverged(args):
        raise DivergedTraining("training diverged at step 3")

    monkeypatch.setattr(cli, "_train", diverged)
    assert cli.main(["train", "--relation", "antonym"]) == 2
    assert capsys.readouterr().err == "ffv: error: training diverged at step 3\n"
