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
