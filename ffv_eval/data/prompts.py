"""The Q/A prompt template of the function-vector papers: `Q: x\nA: y\n\n` per demonstration,
then `Q: x\nA:` for the query; the answer is ` y`."""

from __future__ import annotations

import random
from collections.abc import Sequence

from ffv_eval.data.relations import WordPair

ANSWER_DELIMITER = " "
DEMO_SEPARATOR = "\n\n"


def query_text(word: str) -> str:
    return f"Q: {word}\nA:"


def demo_text(pair: WordPair) -> str:
    return f"{query_text(pair.input)}{ANSWER_DELIMITER}{pair.output}"


def fewshot_prompt(demos: Sequence[WordPair], query: str) -> str:
    return "".join(demo_text(p) + DEMO_SEPARATOR for p in demos) + query_text(query)


def answer_text(word: str) -> str:
    return ANSWER_DELIMITER + word


def shuffled_label_demos(demos: Sequence[WordPair], rng: random.Random) -> list[WordPair]:
    """The corrupted prompts of causal mediation: the same inputs with their outputs permuted,
    so the demonstrations no longer show the relation."""
    outputs = [p.output for p in demos]
    for _ in range(10):
        rng.shuffle(outputs)
        if len(outputs) < 2 or any(o != p.output for o, p in zip(outputs, demos)):
            break
    return [WordPair(p.input, o) for p, o in zip(demos, outputs)]
