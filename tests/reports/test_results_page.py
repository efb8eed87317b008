"""docs/results.md's figures against the committed results (ffv_eval.reports.results_page)."""

import pytest

from ffv_eval.reports import results_page


def test_the_results_page_matches_the_committed_results():
    text = results_page.PAGE.read_text()
    names = [m["name"] for m in results_page.BLOCK.finditer(text)]
    assert set(names) == set(results_page.blocks()), "every block is on the page once"
    new, changed = results_page.render(text)
    assert not changed, f"docs/results.md is out of date in {changed}: run python -m ffv_eval.reports.results_page"
    assert new == text


def test_a_figure_edited_by_hand_is_caught_and_an_unknown_block_refused():
    builders = {"one": lambda: "| a | 0.500 |\n", "two": lambda: "x\n"}
    page = "intro\n<!-- generated:one -->\n| a | 0.500 |\n<!-- /generated:one -->\n<!-- generated:two -->\nx\n<!-- /generated:two -->\n"
    assert results_page.render(page, builders) == (page, [])
    edited = page.replace("0.500", "0.550")
    assert results_page.render(edited, builders) == (page, ["one"])
    with pytest.raises(KeyError, match="generated block 'three' has no builder"):
        results_page.render(page + "<!-- generated:three -->\n<!-- /generated:three -->\n", builders)


def _variants_file(tmp_path, variants):
    import json

    data = {"model": "m", "split": "validation", "metric": "first-word exact match", "variants": variants}
    (tmp_path / "ffv-variants-m.json").write_text(json.dumps(data))


def _variant(correct_by_relation, settings=None, seconds=0):
    return {"settings": settings or {}, "train_seconds": seconds,
            "relations": {r: {"correct": c, "n_train": 20} for r, c in correct_by_relation.items()}}


def test_ffv_variants_are_paired_question_by_question_against_the_shipped_ffvs(tmp_path):
    shipped = _variant({"a": [1, 0, 0, 0], "b": [1, 1, 0, 0]})
    better = _variant({"a": [1, 1, 1, 0], "b": [1, 1, 1, 0]}, {"n_pairs": "all", "steps": 30}, 12.3)
    _variants_file(tmp_path, {"shipped": shipped, "more": better})
    text = results_page.ffv_variants_block(models=("m", "absent"), directory=tmp_path)
    assert "**m**, 2 relations, 8 validation questions" in text
    rows = [line for line in text.splitlines() if line.startswith("| more") or line.startswith("| shipped")]
    # sorted best first; 6/8 against 3/8: +0.375, 3 discordant questions all one way (McNemar p 0.25)
    assert rows[0].startswith("| more | n_pairs all, steps 30 | 0.750 | +0.375 [")
    assert rows[0].endswith("| 0.25 | 12 |")
    assert rows[1] == "| shipped | (reference) | 0.375 |  |  |  |"


def test_ffv_variants_on_other_questions_than_the_shipped_ffvs_are_refused(tmp_path):
    _variants_file(tmp_path, {"shipped": _variant({"a": [1, 0]}), "other": _variant({"a": [1, 0, 1]})})
    with pytest.raises(results_page.PairingError, match="variant 'other' scored other relations or questions"):
        results_page.ffv_variants_block(models=("m",), directory=tmp_path)
    _variants_file(tmp_path, {"other": _variant({"a": [1, 0]})})
    with pytest.raises(results_page.PairingError, match="no 'shipped' variant"):
        results_page.ffv_variants_block(models=("m",), directory=tmp_path)
