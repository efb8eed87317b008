"""Scoring CFV settings on multiple-choice analogy questions (the `valid.jsonl` splits of U2, U4,
BATS and Google): `acc_d` as the lm-eval tasks compute it (tasks/analogies, one-shot template),
the choice whose D is most likely after `Q: A\\nA: B\\n\\nQ: C\\nA:` with the question's CFV added
at that prompt's last token. composite_fit.fit_composite_map uses it to choose how a posterior
becomes a CFV; the test splits are never read here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ffv_eval.data.analogies import AnalogyDataError, analogy_questions_path, read_analogy_questions
from ffv_eval.data.prompts import fewshot_prompt
from ffv_eval.data.relations import WordPair
from ffv_eval.models.loading import input_device
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tokens import encode_answers, pad_id_of
from ffv_eval.vectors.scoring import cached_tail_log_probs

VALIDATION_SETS = ("u2", "u4", "bats", "google")  # the multiple-choice sets with a valid.jsonl split


@dataclass(frozen=True)
class ChoiceQuestion:
    source: str  # the question set
    a: str
    b: str
    choices: tuple[tuple[str, str], ...]  # (C, D) per choice
    answer: int


def validation_questions(data_dir, sets: Sequence[str] = VALIDATION_SETS, per_set: int = 0) -> list[ChoiceQuestion]:
    """The `valid.jsonl` questions of each set (its first `per_set`, 0: all); sets without the
    file in the data directory are skipped (the caller reports which were used)."""
    out = []
    for name in sets:
        try:
            path = analogy_questions_path(name, "valid", data_dir)
        except AnalogyDataError:  # the data directory has no valid split of this set (names are checked in MapSettings)
            continue
        rows = read_analogy_questions(path)
        for q in rows[: per_set or len(rows)]:
            out.append(ChoiceQuestion(name, q["stem"][0], q["stem"][1], tuple((c, d) for c, d in q["choice"]), int(q["answer"])))
    return out


class QuestionScorer:
    """acc_d of many CFV settings on one list of questions: every choice's prompt runs once
    through the model up to its last token (key/value cache), then its last token and D's tokens
    once per setting, all settings of a chunk of prompts in one pass."""

    def __init__(self, patcher: Patcher, tokenizer, questions: Sequence[ChoiceQuestion], layer: int):
        self.patcher, self.questions, self.layer = patcher, list(questions), layer
        self.pad = pad_id_of(tokenizer)
        rows = [(i, c, d) for i, q in enumerate(self.questions) for c, d in q.choices]
        encoded = encode_answers(tokenizer, [fewshot_prompt([WordPair(self.questions[i].a, self.questions[i].b)], c) for i, c, _ in rows],
                                 [d for _, _, d in rows])
        self.question_of = [i for i, _, _ in rows]
        self.contexts, self.answers = encoded.context_ids, encoded.answer_ids

    def acc_d(self, settings: Sequence[torch.Tensor | None]) -> list[dict[str, float]]:
        """Per setting (CFVs [questions, hidden], or None: unpatched), acc_d per question set and
        their mean over sets ("mean")."""
        return [self._accuracy(row.cpu()) for row in self.choice_scores(settings)]

    def choice_scores(self, settings: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """[settings, choices]: log P(D | `Q: A\nA: B\n\nQ: C\nA:`) of every choice (question by
        question) with its question's vector of each setting (None: unpatched), float32
        (vectors.scoring.cached_tail_log_probs)."""
        device = input_device(self.patcher.model)
        hidden = self.patcher.adapter.hidden_size
        # float32 vectors; the Patcher casts them to the hidden state's dtype where it adds them.
        stacked = torch.stack([torch.zeros(len(self.questions), hidden, device=device) if s is None else s.to(device, torch.float32)
                               for s in settings])  # [settings, questions, hidden]
        question_of = torch.tensor(self.question_of, dtype=torch.long, device=device)
        scores = cached_tail_log_probs(self.patcher, self.layer, self.contexts, self.answers, len(settings),
                                       lambda chunk: stacked[:, question_of[chunk]].transpose(0, 1), self.pad)
        return scores.T

    def _accuracy(self, scores: torch.Tensor) -> dict[str, float]:
        hits: dict[str, list[float]] = {}
        start = 0
        for q in self.questions:
            choice = int(scores[start : start + len(q.choices)].argmax())
            hits.setdefault(q.source, []).append(float(choice == q.answer))
            start += len(q.choices)
        out = {name: sum(h) / len(h) for name, h in hits.items()}
        out["mean"] = sum(out.values()) / len(out) if out else 0.0
        return out
