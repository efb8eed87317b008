"""The main job: score a model on the relation tasks zero-shot, with each relation's vector
patched in, and with k-shot prompting, all through lm-eval, and print the comparison."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ffv_eval import DEFAULT_MODEL, TASKS_DIR
from ffv_eval.files.atomic import atomic_write_text
from ffv_eval.data.relations import HEADLINE_RELATIONS, load_project_relation, load_todd_relation, project_relations
from ffv_eval.progress import show_progress
from ffv_eval.vectors.store import KINDS, VectorNameError, shipped_path


def _score(lm, task_manager, task: str, num_fewshot: int, limit: int | None) -> dict:
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
        log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    metrics = out["results"][task]
    return {"exact_match": metrics["exact_match,none"], "stderr": metrics["exact_match_stderr,none"]}


def compare_conditions(model: str = DEFAULT_MODEL, relations=None, limit=None, batch_size=16, num_fewshot=10,
                       data_dir=None, output=None, kinds=None, markdown=None, command=None, placement=None) -> dict:
    """Per relation: zero-shot, patched with the model's shipped vector of each kind in `kinds`
    (fv, ffv, ffv-random), and num_fewshot-shot, each an lm-eval run of relation_<name>.
    placement: a model_loading.Placement, passed to lm-eval's HFLM as device=, dtype= (and
    parallelize=True with the device map)."""
    from lm_eval.tasks import TaskManager

    from ffv_eval.harness.model import FFVPatchedLM
    from ffv_eval.models.loading import Placement

    model_args = (placement or Placement()).lm_eval_args()  # validated before any model work

    relations = project_relations() if relations in (["all"], ("all",)) else list(relations or HEADLINE_RELATIONS)
    if kinds is None:  # every kind of vector shipped for all the relations
        kinds = [k for k in KINDS if all(shipped_path(model, k, name).exists() for name in relations)]
    for name in relations:  # bad names, data files and missing vectors fail before the model loads
        load_todd_relation(name, data_dir) if data_dir else load_project_relation(name)
        for kind in kinds:
            if not shipped_path(model, kind, name).exists():
                raise VectorNameError(f"no shipped {kind} for {name} on {model}: {shipped_path(model, kind, name)}")
    task_manager = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": data_dir} if data_dir else None)
    lm = FFVPatchedLM(pretrained=model, vector="none", batch_size=batch_size, **model_args)
    conditions = ["zero_shot", *kinds, f"{num_fewshot}_shot"]
    rows = {}
    for name in relations:
        task, t = f"{'todd' if data_dir else 'relation'}_{name}", time.perf_counter()  # todd_<name>: Todd et al.'s files
        row = {"vectors": {}}
        for condition in conditions:
            lm.set_vector(None if condition in ("zero_shot", conditions[-1]) else str(shipped_path(model, condition, name)))
            if lm.stored_vector is not None:
                row["vectors"][condition] = {"path": str(lm.stored_vector.path), "layer": lm.patch_layer}
            row[condition] = _score(lm, task_manager, task, num_fewshot if condition == conditions[-1] else 0, limit)
        lm.set_vector(None)
        row["seconds"] = time.perf_counter() - t
        rows[name] = row
        show_progress(f"[ffv] {task}: " + ", ".join(f"{c} {row[c]['exact_match']:.3f}" for c in conditions))
    report = {"model": model, "data": "todd" if data_dir else "project", "limit": limit, "conditions": conditions, "relations": rows}
    table = format_table(report)
    print(table)
    if output:
        atomic_write_text(Path(output), json.dumps(report, indent=2) + "\n")
    if markdown:
        regenerate = f"\n\nRegenerate with:\n\n```bash\n{command}\n```\n" if command else "\n"
        atomic_write_text(Path(markdown), f"# {model}: relation completion\n\n{table}{regenerate}")
    return report


def format_table(report: dict) -> str:
    """Markdown: one row per relation, one column per condition (exact match ± stderr), and the mean."""
    conditions = report["conditions"]
    lines = [
        f"{report['model']} on {report['data']} data: exact match of the first generated word(s), ± stderr"
        + (f" (first {report['limit']} test pairs)" if report.get("limit") else ""),
        "",
        "| relation | " + " | ".join(c.replace("_", "-") for c in conditions) + " |",
        "|---" * (len(conditions) + 1) + "|",
    ]
    for name, row in report["relations"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]['exact_match']:.3f} ± {row[c]['stderr']:.3f}" for c in conditions) + " |")
    means = [sum(r[c]["exact_match"] for r in report["relations"].values()) / len(report["relations"]) for c in conditions]
    lines.append("| **mean** | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")
    return "\n".join(lines)
