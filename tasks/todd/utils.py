# Hooks for the todd task YAMLs (lm-eval resolves `!function utils.<name>` here).
from ffv_eval.data.task_data import todd_dataset  # noqa: F401
