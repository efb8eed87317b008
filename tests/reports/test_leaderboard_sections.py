"""The leaderboard's extra sections (ffv_eval.reports.leaderboard_sections): the paired alignment
rows from an `ffv align` report."""

from tests.conftest import toy_alignment


def test_the_leaderboard_shows_the_paired_alignment_rows(tmp_path):
    import json

    from ffv_eval.evaluation.alignment import compare_sets
    from ffv_eval.reports.leaderboard_sections import alignment_section

    sets, similarities, comparisons = toy_alignment()
    report = {"model": "toy", "sets": sets, "comparisons": compare_sets(similarities, comparisons, sets, resamples=500)}
    path = tmp_path / "align.json"
    path.write_text(json.dumps(report))
    title, header, rows = alignment_section([str(path)])
    rs = report["comparisons"]["good - noise"]["relsim"]
    assert [r[1] for r in rows] == ["noise", "good", "paired: good - noise"]
    assert rows[2][2] == f"{rs['difference']:+.3f} [{rs['ci95'][0]:+.3f}, {rs['ci95'][1]:+.3f}], p={rs['p']:.3g}"
    assert "paired permutation" in title and "Wilcoxon" in title
