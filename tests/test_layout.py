"""The import rule of the package layout: each subpackage imports only from the layers below it,
and reports/ (reading results, rendering tables) imports neither torch nor models/ nor anything
that runs a model, checked statically (every import statement, inside functions too) and by
importing each reports module in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ffv_eval"
# Bottom to top: a module may import from its own layer and the ones listed before it.
# reports/ also keeps off models/, harness/ and any module that loads torch (the tests below).
LAYERS = [
    {"errors", "progress", "dependency_versions", "__init__", "files"},
    {"data"},
    {"models"},
    {"vectors"},
    {"harness"},
    {"reports"},
    {"evaluation"},
    {"cli", "__main__"},
]
HEAVY = ("torch", "transformers", "nnsight", "lm_eval", "accelerate", "safetensors")
LIGHT = ("lm_eval.utils",)  # lm-eval's argument parsing: no torch (the fresh-interpreter test checks)


def _layer_of(part: str) -> int:
    for index, names in enumerate(LAYERS):
        if part in names:
            return index
    raise AssertionError(f"ffv_eval/{part} is in no layer of tests/test_layout.py's LAYERS: add it")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        yield path, relative.parts[0].removesuffix(".py")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def test_every_import_goes_down_the_layers():
    wrong = []
    for path, part in _modules():
        own = _layer_of(part)
        for line, module in _imports(path):
            if module.startswith("ffv_eval."):
                target = module.split(".")[1]
                if _layer_of(target) > own:
                    wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} (layer {target} is above {part})")
    assert not wrong, "\n".join(wrong)


def test_reports_import_no_torch_and_no_model_code_statically():
    wrong = []
    for path, part in _modules():
        if part != "reports":
            continue
        for line, module in _imports(path):
            top = module.split(".")[0]
            if (top in HEAVY and module not in LIGHT) or module.startswith(("ffv_eval.models", "ffv_eval.harness")):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(f"ffv_eval.reports.{p.stem}" for p in (PACKAGE / "reports").glob("*.py")))
def test_a_reports_module_loads_without_torch(module):
    code = (f"import sys, {module}; heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}); "
            "print(','.join(heavy)); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"{module} pulls in {done.stdout.strip() or done.stderr[-2000:]}"
