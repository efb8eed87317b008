# Hooks for the relation task YAMLs (lm-eval resolves `!function utils.<name>` here).
from ffv_eval.data.task_data import process_relation_results, relation_dataset  # noqa: F401
