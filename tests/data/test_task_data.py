"""The relation tasks' scoring (ffv_eval.data.task_data)."""

import pytest

from ffv_eval.data.task_data import first_word_match


@pytest.mark.parametrize("generation,target,hit", [
    (" cold\n", "cold", 1.0), (" Cold.", "cold", 0.0), (' "cold", said', "cold", 1.0),
    (" United States of", "United States", 1.0), (" United Kingdom", "United States", 0.0), ("", "cold", 0.0),
])
def test_first_word_scoring(generation, target, hit):
    assert first_word_match(generation, target) == hit
