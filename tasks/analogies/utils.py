# Hooks for the analogy task YAMLs (lm-eval resolves `!function utils.<name>` here).
from ffv_eval.data.analogies import (  # noqa: F401
    analogy_completion_dataset,
    analogy_questions_dataset,
    one_shot_choices,
    plain_choices,
    process_choice_results,
    process_completion_results,
    ucla_vat_dataset,
)
