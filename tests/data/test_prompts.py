"""Prompt building (ffv_eval.data.prompts)."""

import random

from ffv_eval.data.relations import WordPair


def test_shuffled_labels_break_the_relation():
    demos = [WordPair(f"w{i}", f"o{i}") for i in range(10)]
    from ffv_eval.data.prompts import shuffled_label_demos

    shuffled = shuffled_label_demos(demos, random.Random(0))
    assert [p.input for p in shuffled] == [p.input for p in demos]
    assert sorted(p.output for p in shuffled) == sorted(p.output for p in demos)
    assert any(a.output != b.output for a, b in zip(shuffled, demos))
