"""Extra leaderboard tables from the project's own reports: `ffv align` (agreement with human
judgments) and `ffv check` baselines (per-vector test accuracy, gain, decoding hits)."""

from __future__ import annotations

from collections.abc import Sequence

from ffv_eval.errors import FFVError
from ffv_eval.files.json_lines import json_object
from ffv_eval.reports.paired import signed_interval


class SectionError(FFVError, ValueError):
    """An `ffv align` report or `ffv check` baseline given to the leaderboard that is not one."""


def _document(path: str, what: str, required: Sequence[str]) -> dict:
    return json_object(path, SectionError, required, what)


def alignment_section(paths: Sequence[str]) -> tuple[str, list[str], list[list]]:
    """Per model: each vector set's figures, then (reports that have them) the paired
    differences between sets, `ffv - fv`, with interval and p (test named in the title)."""
    rows = []
    for path in paths:
        report = _document(path, "an `ffv align` report", ("model", "sets"))
        for kind, figures in report["sets"].items():
            rs, sp = figures["relsim"], figures["semeval_prototypicality"]
            rows.append([report["model"], kind, f"{rs['spearman']:.3f} [{rs['ci95'][0]:.3f}, {rs['ci95'][1]:.3f}]",
                         rs["n_comparisons"], f"{sp['mean_spearman']:.3f} [{sp['ci95'][0]:.3f}, {sp['ci95'][1]:.3f}]",
                         sp["n_subcategories"]])
        for name, difference in (report.get("comparisons") or {}).items():
            rs, sp = difference["relsim"], difference["semeval_prototypicality"]
            rows.append([report["model"], f"paired: {name}", f"{signed_interval(rs['difference'], rs['ci95'])}, p={rs['p']:.3g}",
                         rs["n"], f"{signed_interval(sp['mean_difference'], sp['ci95'])}, p={sp['p']:.3g}", sp["n"]])
    header = ["model", "vectors", "relsim Spearman [95% CI]", "comparisons", "SemEval prototypicality Spearman [95% CI]", "subcategories"]
    return ("Alignment with human judgments (ffv align; paired rows: difference over the same items, relsim by paired "
            "permutation test, SemEval by Wilcoxon signed-rank)", header, rows)


def vector_quality_section(paths: Sequence[str]) -> tuple[str, list[str], list[list]]:
    """Per model and relation: zero-shot, then per vector kind test accuracy / decoding hits."""
    rows = []
    for path in paths:
        baseline = _document(path, "an `ffv check` baseline", ("model", "vectors"))
        by_relation: dict[str, dict] = {}
        for figures in baseline["vectors"].values():
            by_relation.setdefault(figures["relation"], {})[figures["kind"]] = figures
        for relation, kinds in sorted(by_relation.items()):
            zero = next(iter(kinds.values()))["zero_shot_accuracy"]
            cells = [f"{kinds[k]['accuracy']:.2f} / {kinds[k]['decoding_hits']}" if k in kinds else ""
                     for k in ("fv", "ffv", "ffv-random")]
            rows.append([baseline["model"], relation, f"{zero:.2f}", *cells])
    header = ["model", "relation", "zero-shot", "FV: accuracy / decoding hits", "FFV: accuracy / decoding hits",
              "FFV random init: accuracy / decoding hits"]
    return "Vectors on held-out pairs: first-token accuracy and decoding hits (answer tokens among the top 20)", header, rows
