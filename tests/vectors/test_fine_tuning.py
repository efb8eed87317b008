"""Fine-tuned function vectors (ffv_eval.vectors.fine_tuning): batched training of several relations
on a tiny model equals training each alone; on the real Gemma 3 270M (through the `ffv train`
job), the loss falls, a rerun is bit-identical, the random start is the ablation, and bad
training input is refused."""

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

from ffv_eval import VECTORS_DIR
from ffv_eval.data.relations import RelationDataError, WordPair, load_relation
from ffv_eval.errors import SettingError
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tiny import tiny_llama
from ffv_eval.vectors.fine_tuning import (
    DivergedTraining,
    TrainingSettings,
    train_function_vector,
    train_function_vectors,
)
from ffv_eval.vectors.function_vectors import ICL_SHOTS, icl_difference_vector
from ffv_eval.vectors.jobs import train_and_save
from ffv_eval.vectors.store import VectorFileError, load_vector
from tests.conftest import CharTokenizer

QUICK = TrainingSettings(steps=8, batch_size=4)


def _relation(offset: int) -> list[WordPair]:
    words = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]
    return [WordPair(w, words[(i + offset) % len(words)]) for i, w in enumerate(words)]


def test_batched_training_of_several_relations_equals_training_each_alone():
    torch.manual_seed(0)
    patcher = Patcher(tiny_llama())
    tokenizer = CharTokenizer()
    settings = TrainingSettings(steps=8, batch_size=3, seed=3)
    initials = torch.randn(3, 32)
    together = train_function_vectors(patcher, tokenizer, [_relation(k) for k in (1, 2, 3)], 1, initials, settings)
    for k, result in zip((1, 2, 3), together):
        alone = train_function_vector(patcher, tokenizer, _relation(k), 1, initials[k - 1], settings)
        assert torch.allclose(result.vector, alone.vector, atol=1e-5), k
        assert result.losses == pytest.approx(alone.losses, abs=1e-5)
        assert not torch.allclose(result.vector, result.initial_vector)  # it trained


def test_the_icl_diff_start_is_the_training_pairs_in_context_difference_and_the_fv_is_not_used():
    patcher, tokenizer = Patcher(tiny_llama()), CharTokenizer()
    pairs = _relation(2)
    settings = TrainingSettings(steps=2, batch_size=2, init="icl-diff", seed=5)
    result = train_function_vector(patcher, tokenizer, pairs, 1, torch.randn(32), settings)
    expected = icl_difference_vector(patcher, tokenizer, pairs, 1, ICL_SHOTS, seed=5)
    assert torch.allclose(result.initial_vector, expected, atol=1e-6)
    # another FV gives the same start: only its layer (given here) matters
    again = train_function_vector(patcher, tokenizer, pairs, 1, torch.randn(32), settings)
    assert torch.equal(again.initial_vector, result.initial_vector) and torch.equal(again.vector, result.vector)
    fv_start = train_function_vector(patcher, tokenizer, pairs, 1, torch.ones(32), dataclasses.replace(settings, init="fv"))
    assert torch.equal(fv_start.initial_vector, torch.ones(32))


def test_an_unknown_start_is_refused():
    with pytest.raises(SettingError, match="--init must be one of fv, random, icl-diff"):
        train_function_vector(Patcher(tiny_llama()), CharTokenizer(), _relation(1), 1, torch.randn(32),
                              TrainingSettings(steps=1, init="zeros"))


# -- Gemma 3 270M -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_lowers_the_loss_and_is_bit_identical_when_repeated(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train_and_save("gemma-3-270m", "antonym", out=str(first), settings=QUICK)
    train_and_save("gemma-3-270m", "antonym", out=str(second), settings=QUICK)
    assert first.read_bytes() == second.read_bytes()
    assert first.with_suffix(".json").read_text() == second.with_suffix(".json").read_text()
    stored = load_vector(first)
    meta = stored.metadata
    fv = load_vector(VECTORS_DIR / "gemma-3-270m" / "fv" / "antonym.safetensors")
    assert meta["kind"] == "ffv" and meta["init"] == "fv" and meta["layer"] == fv.metadata["layer"]
    assert meta["metrics"]["last_loss"] < meta["metrics"]["first_loss"]
    assert not torch.equal(stored.vector, fv.vector)
    assert meta["data"]["n_test"] >= 50 and meta["settings"]["n_pairs"] == 20
    assert meta["scale"] == meta["settings"]["scale"] == QUICK.scale  # applied to the saved vector


@pytest.mark.slow
def test_random_init_is_the_ablation(tmp_path, gemma):
    out = tmp_path / "r.safetensors"
    # a batch of all 20 training pairs: the first step's loss does not depend on the sampling order
    train_and_save("gemma-3-270m", "antonym", out=str(out), settings=TrainingSettings(steps=2, batch_size=20, init="random", loss="first-token"))
    meta = load_vector(out).metadata
    assert meta["kind"] == "ffv-random" and meta["init"] == "random"
    fv_norm = load_vector(VECTORS_DIR / "gemma-3-270m" / "fv" / "antonym.safetensors").vector.norm()
    assert abs(load_vector(out).vector.norm() / fv_norm - 1) < 0.5
    # the first loss, recomputed: the seeded random start (the FV's norm) added after block `layer` at
    # each prompt's last token by a torch forward hook, cross-entropy of the answers' first tokens,
    # plus the L2 term, its weight times (|v0| / |v0|)^2 = 1 at the start
    model, tok = gemma
    start = torch.randn(640, generator=torch.Generator().manual_seed(0))
    start = start / start.norm() * fv_norm
    pairs = load_relation("antonym").train[:20]
    prompts = [f"Q: {p.input}\nA:" for p in pairs]
    answers = [tok(f"{q} {p.output}").input_ids[len(tok(q).input_ids)] for q, p in zip(prompts, pairs)]
    side, tok.padding_side = tok.padding_side, "right"
    batch = tok(prompts, return_tensors="pt", padding=True)
    tok.padding_side = side
    last = batch.attention_mask.sum(1) - 1
    rows = torch.arange(len(prompts))

    def add(module, args, output):
        output = output.clone()
        output[rows, last] += start
        return output

    handle = model.model.layers[meta["layer"]].register_forward_hook(add)
    try:
        logits = model(**batch).logits[rows, last]
    finally:
        handle.remove()
    expected = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(answers)).item() + meta["settings"]["l2"]
    assert meta["metrics"]["first_loss"] == pytest.approx(expected, rel=1e-4)


def _pairs_file(tmp_path, pairs):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"input": a, "output": b}) + "\n" for a, b in pairs))
    return str(path)


@pytest.mark.slow
def test_bad_training_input_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "v.safetensors"
    test_pair = load_relation("antonym").test[0]
    many = [(f"word{i}", f"drow{i}") for i in range(25)]
    for pairs, message in (
        (many[:5], "5 training pairs, need at least 20"),
        (many + [("word3", "other")], "duplicate training inputs: word3"),
        (many + [(test_pair.input, test_pair.output)], f"overlap the test split: {test_pair.input}"),
    ):
        with pytest.raises(RelationDataError, match=message):
            train_and_save("gemma-3-270m", "antonym", out=str(out), settings=QUICK, pairs_file=_pairs_file(tmp_path, pairs))
    with pytest.raises(DivergedTraining, match="diverged at step"):
        train_and_save("gemma-3-270m", "antonym", out=str(out), settings=TrainingSettings(steps=5, learning_rate=1e30))
    with pytest.raises(VectorFileError, match="no function vector to start from"):
        train_and_save("gemma-3-270m", "antonym", out=str(out), start_from=str(tmp_path / "missing.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]
    out.write_text("keep me")
    with pytest.raises(VectorFileError, match="exists; pass --force"):
        train_and_save("gemma-3-270m", "antonym", out=str(out), settings=QUICK)
    assert out.read_text() == "keep me"


def _hooked_answer_loss(model, tokenizer, pairs, layer, vector, loss):
    """Reference: one unpadded forward per pair with `vector` added after block `layer` at the
    prompt's last token (a torch forward hook), the answer teacher-forced after the prompt; the
    mean cross-entropy of its tokens (loss="answer"), of its tokens and a newline after it
    ("answer-newline") or of its first token; the mean over pairs."""
    total = 0.0
    for pair in pairs:
        prompt = f"Q: {pair.input}\nA:"
        context = tokenizer(prompt).input_ids
        ending = "\n" if loss == "answer-newline" else ""
        answer = tokenizer(f"{prompt} {pair.output}{ending}").input_ids[len(context):]
        answer = answer[:1] if loss == "first-token" else answer
        ids = torch.tensor([context + answer[:-1]])

        def add(module, args, output, at=len(context) - 1):
            output = output.clone()
            output[0, at] += vector
            return output

        handle = model.model.layers[layer].register_forward_hook(add)
        try:
            logits = model(input_ids=ids).logits[0].float()
        finally:
            handle.remove()
        at = torch.arange(len(answer)) + len(context) - 1
        total += torch.nn.functional.cross_entropy(logits[at], torch.tensor(answer)).item()
    return total / len(pairs)


@pytest.mark.parametrize("loss", ["answer", "answer-newline", "first-token"])
def test_the_first_step_loss_equals_a_hooked_forward_over_the_answer_tokens(loss):
    torch.manual_seed(0)
    model = tiny_llama()
    tokenizer = CharTokenizer()
    pairs = [WordPair(a, b) for a, b in [("ab", "cde"), ("fg", "hij"), ("kl", "mnop"), ("qr", "st")]]
    initial = torch.randn(32, generator=torch.Generator().manual_seed(5))
    settings = TrainingSettings(steps=1, batch_size=len(pairs), l2=0.0, loss=loss)  # one step over every pair
    result = train_function_vector(Patcher(model), tokenizer, pairs, 1, initial, settings)
    expected = _hooked_answer_loss(model, tokenizer, pairs, 1, initial, loss)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)
    if loss != "first-token":  # the answers are several tokens long: the whole-answer losses are other numbers
        others = [other for other in ("answer", "answer-newline", "first-token") if other != loss]
        for other in others:
            assert result.losses[0] != pytest.approx(_hooked_answer_loss(model, tokenizer, pairs, 1, initial, other), rel=1e-3)


class _SpaceMergingTokenizer(CharTokenizer):
    """CharTokenizer, but a space and the character after it are one token (ids 103..119), so
    that an answer's first token can differ from the input's."""

    def __call__(self, text, add_special_tokens=True):
        ids, i = [1] if add_special_tokens else [], 0
        while i < len(text):
            if text[i] == " " and i + 1 < len(text):
                ids.append(103 + ord(text[i + 1]) % 17)
                i += 2
            else:
                ids.append(3 + ord(text[i]) % 100)
                i += 1
        return SimpleNamespace(input_ids=ids)


def test_the_copy_penalty_adds_the_unlikelihood_of_the_inputs_first_token_where_the_answer_begins():
    torch.manual_seed(0)
    model, tokenizer = tiny_llama(), _SpaceMergingTokenizer()
    # the last pair's answer begins with the input's first token: it is exempt
    pairs = [WordPair(a, b) for a, b in [("ab", "cde"), ("fg", "hij"), ("kl", "mnop"), ("qr", "qst")]]
    initial = torch.randn(32, generator=torch.Generator().manual_seed(5))
    plain = TrainingSettings(steps=1, batch_size=len(pairs), l2=0.0, loss="answer")
    base = train_function_vector(Patcher(model), tokenizer, pairs, 1, initial, plain).losses[0]
    assert base == pytest.approx(_hooked_answer_loss(model, tokenizer, pairs, 1, initial, "answer"), rel=1e-5)
    penalised = train_function_vector(Patcher(model), tokenizer, pairs, 1, initial, dataclasses.replace(plain, copy_penalty=2.0))
    terms = []
    for pair in pairs:
        context = tokenizer(f"Q: {pair.input}\nA:").input_ids
        copy, answer = tokenizer(f" {pair.input}", False).input_ids[0], tokenizer(f" {pair.output}", False).input_ids[0]
        handle = model.model.layers[1].register_forward_hook(lambda m, a, out, at=len(context) - 1: _added(out, at, initial))
        try:
            p_copy = model(input_ids=torch.tensor([context])).logits[0, -1].float().softmax(-1)[copy].item()
        finally:
            handle.remove()
        terms.append(0.0 if copy == answer else -math.log1p(-p_copy))
    assert terms[-1] == 0.0 and all(t > 0 for t in terms[:-1])
    assert penalised.losses[0] == pytest.approx(base + 2.0 * sum(terms) / len(pairs), rel=1e-5)


def _added(output, at, vector):
    output = output.clone()
    output[0, at] += vector
    return output


@pytest.mark.parametrize("penalty", [-0.5, float("nan")])
def test_a_copy_penalty_below_zero_is_refused(penalty):
    with pytest.raises(SettingError, match="copy_penalty must be a number >= 0"):
        TrainingSettings(copy_penalty=penalty).checked()


def test_the_trained_vector_is_returned_times_the_scale_and_the_training_is_unchanged():
    torch.manual_seed(0)
    patcher, tokenizer = Patcher(tiny_llama()), CharTokenizer()
    initial = torch.randn(32, generator=torch.Generator().manual_seed(2))
    as_trained = train_function_vector(patcher, tokenizer, _relation(1), 1, initial, TrainingSettings(steps=6, batch_size=3, scale=1.0))
    scaled = train_function_vector(patcher, tokenizer, _relation(1), 1, initial, TrainingSettings(steps=6, batch_size=3, scale=0.5))
    assert scaled.losses == as_trained.losses
    assert torch.equal(scaled.vector, as_trained.vector * 0.5)
    assert torch.equal(scaled.initial_vector, as_trained.initial_vector)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_a_scale_that_is_not_a_positive_number_is_refused(scale):
    with pytest.raises(SettingError, match="--scale must be a positive number"):
        train_function_vector(Patcher(tiny_llama()), CharTokenizer(), _relation(1), 1, torch.randn(32),
                              TrainingSettings(steps=1, scale=scale))


def test_an_unknown_loss_is_refused():
    with pytest.raises(SettingError, match="--loss must be one of answer, answer-newline, first-token"):
        train_function_vector(Patcher(tiny_llama()), CharTokenizer(), _relation(1), 1, torch.randn(32),
                              TrainingSettings(steps=1, loss="perplexity"))


def test_the_command_line_offers_every_loss_and_start():
    from ffv_eval.cli import build_parser
    from ffv_eval.vectors.fine_tuning import INITS, LOSSES

    commands = build_parser()._subparsers._group_actions[0].choices
    train = {a.dest: a for a in commands["train"]._actions}
    assert tuple(train["loss"].choices) == LOSSES
    assert tuple(train["init"].choices) == INITS
    library = next(a for a in commands["build-library"]._actions if a.dest == "init")
    assert tuple(library.choices) == tuple(i for i in INITS if i != "random")
