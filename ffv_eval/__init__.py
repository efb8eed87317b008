"""ffv-eval: function vectors (FV), fine-tuned FVs (FFV) and composite FVs (CFV) for lm-eval."""

# Keep this module import-light: the lm-eval import hook (_ffv_eval_autoload) imports it
# inside every program that imports lm-eval.
from pathlib import Path

from ffv_eval.dependency_versions import check_installed_versions

__version__ = "0.1.0"

# torch, lm-eval, nnsight and transformers inside the ranges pyproject.toml declares, or a
# clear ImportError now (read from metadata; none of them is imported here).
check_installed_versions(__version__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# A source checkout (and an editable install) uses <checkout>/tasks and <checkout>/vectors.
# A regular wheel install has no checkout: the build hook (hatch_build.py) ships those
# folders inside the package as ffv_eval/_bundled/{tasks,vectors}.
# VECTORS_DIR holds the shipped vectors, which jobs only read: their default outputs go to
# ./vectors of the working directory (ffv_eval.vectors.library.local_vectors_dir), which is
# VECTORS_DIR itself when the job runs in the checkout (how maintainers rebuild the library).
_BUNDLED = Path(__file__).resolve().parent / "_bundled"
_DATA_ROOT = _BUNDLED if _BUNDLED.is_dir() else PROJECT_ROOT
TASKS_DIR = _DATA_ROOT / "tasks"
VECTORS_DIR = _DATA_ROOT / "vectors"

# The model every `ffv` command and `ffv-patched` use unless told otherwise (embedded: models.loading).
DEFAULT_MODEL = "gemma-3-270m"
