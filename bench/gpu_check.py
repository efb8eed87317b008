"""GPU check: one prepared script for a CUDA machine that reaches no hub. Every model is built
from a transformers config with random weights, and the tokenizer is a small BPE trained here
on the project's own word pairs (tasks/relations/pairs), so nothing is downloaded.

1. Correctness, every tiny model family (ffv_eval.models.tiny.FAMILY_NAMES): the same seeded
   model in float32 on the CPU (the reference) and in bfloat16 on the GPU, compared with the
   tolerances in TOLERANCES: mean head outputs and indirect effects (the cached scan, and the
   scan against the one-forward-per-head loop on the GPU), an FFV trained a few steps from
   the same start, log-likelihoods and greedy generations through lm-eval's `ffv-patched`
   with that FFV, and a CFV from a small random basis with the identity map. One PASS/FAIL
   line per family and check; exit status 1 on any failure.
2. Speed, one random-weight model shaped like Llama-3-8B (32 layers, hidden 4096, 32 heads,
   8 key/value heads, vocabulary 128256, bfloat16, built on the GPU): the cached
   indirect-effect scan over its 1,024 heads on 25 ten-shot prompts against one forward per
   head (Todd et al.'s loop, timed on a subset and extrapolated), FFV training steps per
   second (batch 4), and lm-eval log-likelihood scoring with `ffv-patched` and a vector
   against `--model hf` (HFLM); peak GPU memory and elapsed time of each part.

--small (automatic without CUDA): everything on the CPU, bfloat16 against float32, and the
8B-shaped model shrunk to 4 layers of hidden size 256; a smoke run. --out FILE writes every
figure as JSON.

    python bench/gpu_check.py --small --out /tmp/gpu_check.json           # here, CPU only
    bash bench/gpu_wheels.sh                                              # here: lm-eval, nnsight & co. as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \\
      && PYTHONPATH=/tmp/site python3 bench/gpu_check.py --out $OUT/gpu_check.json   # on the CUDA machine
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import platform
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The checkout's ffv_eval, installed or not (the CUDA machine has no install of it), and
# bench/peak_memory.
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
from peak_memory import peak_label, peak_mib, reset_peak  # noqa: E402

SEED = 0
TINY_VOCAB = 1024  # the tiny models' vocabulary; the tokenizer's is smaller (Gemma 3's image tokens sit at the top)
TOKENIZER_VOCAB = 1000
RELATION = "antonym"  # the project's word pairs every prompt is made of
SPEED_MODEL = "llama3-8b-shape"

# bfloat16 keeps 8 mantissa bits (~3 significant digits), so every comparison of the bfloat16
# model with the float32 reference is relative to the size of the reference figure, or about
# ranks and argmaxes, never exact. The limits leave 2-6x room over the worst family that CPU
# bfloat16 measured (bench/gpu_check.py --small, docs/gpu.md).
TOLERANCES = {
    "mean_heads_rel": 0.05,  # |bf16 - fp32| / |fp32| of the [L, H, D] mean head outputs
    # Indirect effects of a random tiny model are gains of ~1e-4 in probabilities of ~1e-3, so a
    # bfloat16 rounding of the answer's probability moves them by a large share of their size:
    # what must hold is their order (the scan picks the top heads).
    "ie_spearman": 0.9,  # Spearman rank correlation of the effects [prompts x layers x heads]
    "ie_abs": 0.5,  # max |bf16 - fp32| of the effects, relative to max |fp32 effect| (gross errors)
    # ... and the reference's head of largest mean effect is among the bf16 model's top 2; the
    # cached scan against one forward per head, both in bf16, must meet the same three limits.
    "ffv_cos": 0.95,  # cosine between the bf16 and fp32 training updates (v - v0)
    "ffv_loss_rel": 0.01,  # max relative difference of the per-step losses
    "ll_rel": 0.005,  # |bf16 - fp32| of each patched log-likelihood, relative to the fp32 value
    # Greedy decoding of a random model meets near-ties between its two likeliest tokens (about
    # one token in 25 flips under bfloat16 rounding), after which the texts part for good: the
    # figure is the mean share of each generation's text before the first difference, with the
    # fp32 generations with the vector; with the fp32 generations without it, it must be lower
    # by a margin (the vector acts in the bf16 generations too).
    "gen_agree": 0.5,
    "gen_margin": 0.25,
    "cfv_rel": 0.03,  # |bf16 - fp32| / |fp32| of the CFVs
    "posterior_abs": 0.02,  # max |bf16 - fp32| of the posterior over basis relations
}


# -- results ------------------------------------------------------------------------------------
@dataclass
class Check:
    family: str
    name: str
    passed: bool
    detail: str
    figures: dict

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.family:<20} {self.name:<14} {self.detail}"


class Report:
    """Checks, figures and elapsed times, printed as they come; with --out, written as JSON after
    every part (a run stopped by a time limit still leaves what it measured)."""

    def __init__(self, args):
        self.checks: list[Check] = []
        self.figures: dict = {}
        self.elapsed: dict[str, float] = {}
        self.out = Path(args.out) if args.out else None
        self.settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}

    def check(self, family: str, name: str, passed: bool, detail: str, **figures) -> None:
        c = Check(family, name, bool(passed), detail, {k: _plain(v) for k, v in figures.items()})
        self.checks.append(c)
        print(c.line(), flush=True)

    def save(self) -> None:
        if self.out is not None:
            from ffv_eval.files.atomic import atomic_write_text

            atomic_write_text(self.out, json.dumps(self.to_json(), indent=2) + "\n")

    def to_json(self) -> dict:
        return {
            "passed": all(c.passed for c in self.checks),
            "settings": self.settings,
            "environment": _environment(),
            "tolerances": TOLERANCES,
            "checks": [asdict(c) for c in self.checks],
            "figures": self.figures,
            "elapsed_s": self.elapsed,
        }


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _environment() -> dict:
    env = {"python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    for name in ("torch", "transformers", "tokenizers", "lm-eval", "nnsight", "accelerate"):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable):
    """(fn(), seconds), the device's queued work included."""
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


# -- the tokenizer and the prompts --------------------------------------------------------------
def pair_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer (GPT-2 style: every text encodes, spaces join the following
    word) trained on the project's word pairs in the Q/A template, as a transformers fast
    tokenizer; <pad> = 0, <s> = 1, </s> = 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ffv_eval.data.prompts import demo_text
    from ffv_eval.data.relations import project_relation_path, project_relations, read_pairs

    pairs = [p for name in project_relations() for p in read_pairs(project_relation_path(name))]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([demo_text(p) + "\n\n" for p in pairs], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@dataclass
class CheckData:
    """The prompts and pairs every family is checked on."""

    clean: object  # PromptSet: n-shot prompts for the mean head outputs
    corrupted: object  # PromptSet: shuffled-label prompts for the indirect effects
    train_pairs: list
    ll_requests: list[tuple[str, str]]
    gen_contexts: list[str]
    stems: list[tuple[str, str]]


def check_data(tokenizer) -> CheckData:
    from ffv_eval.data.prompts import query_text
    from ffv_eval.data.relations import load_project_relation
    from ffv_eval.models import tokens
    from ffv_eval.vectors import function_vectors as fv
    from ffv_eval.vectors.composite_fit import one_shot_prompt

    relation = load_project_relation(RELATION)
    rng = random.Random(SEED)
    clean = tokens.encode_prompts(tokenizer, *fv.icl_prompts(relation.train, 4, 5, rng, False))
    corrupted = tokens.encode_prompts(tokenizer, *fv.icl_prompts(relation.train, 2, 5, rng, True))
    test = relation.test
    ll = [(query_text(p.input), " " + p.output) for p in test[:4]]
    ll += [(one_shot_prompt(p.input, p.output, q.input), " " + q.output + " and " + p.output) for p, q in zip(test[4:6], test[6:8])]
    return CheckData(clean, corrupted, list(relation.train[:12]), ll, [query_text(p.input) for p in test[8:20]],
                     [(p.input, p.output) for p in test[20:24]])


# -- part 1: correctness of the bfloat16 model against the float32 reference --------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b|, in float32 on the CPU (where the reference lives)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def _common_prefix_share(a: str, b: str) -> float:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return 1.0 if not a and not b else n / max(len(a), len(b))


@torch.no_grad()
def residual_norm(model, prompts, layer: int) -> float:
    """Mean norm of the residual stream after block `layer` at the prompts' last tokens (float32)."""
    from ffv_eval.models.loading import input_device

    norms = []
    for ids in prompts.input_ids:
        out = model(input_ids=torch.tensor([ids], dtype=torch.long, device=input_device(model)), output_hidden_states=True)
        norms.append(float(out.hidden_states[layer + 1][0, -1].float().norm()))
    return sum(norms) / len(norms)


def lm_eval_outputs(model, tokenizer, vector_path: str, scale: float, data: CheckData, unpatched_too: bool = False) -> dict:
    """Patched log-likelihoods and greedy generations through lm-eval's `ffv-patched` (HFLM's
    own request loops); with unpatched_too also the same requests without the vector."""
    from lm_eval.api.instance import Instance

    from ffv_eval.harness.model import FFVPatchedLM

    # softmax_dtype float32: compare the model's arithmetic, not the rounding of a bfloat16
    # log-softmax (resolution ~0.03 nats at log-probabilities near -7) that HFLM would apply.
    lm = FFVPatchedLM(pretrained=model, tokenizer=tokenizer, vector=vector_path, scale=scale, batch_size=4,
                      softmax_dtype="float32")

    def score_and_generate():
        ll = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(data.ll_requests)], disable_tqdm=True)
        gen_args = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
        gens = lm.generate_until([Instance("generate_until", {}, (c, gen_args), i) for i, c in enumerate(data.gen_contexts)],
                                 disable_tqdm=True)
        return {"ll": [x for x, _ in ll], "greedy": [g for _, g in ll], "gen": gens}

    out = {"patched": score_and_generate()}
    if unpatched_too:
        lm.set_vector(None)
        out["unpatched"] = score_and_generate()
    return out


def check_family(family: str, device: torch.device, tokenizer, data: CheckData, report: Report, workdir: Path) -> None:
    from ffv_eval.models import tokens
    from ffv_eval.models.loading import model_fingerprint
    from ffv_eval.models.patching import Patcher
    from ffv_eval.models.tiny import build_tiny_model
    from ffv_eval.vectors import function_vectors as fv
    from ffv_eval.vectors.basis import Basis
    from ffv_eval.vectors.composite import CompositeMap, relation_posterior
    from ffv_eval.vectors.fine_tuning import TrainingSettings, train_function_vector
    from ffv_eval.vectors.store import save_vector

    T = TOLERANCES
    ref = build_tiny_model(family, vocab_size=TINY_VOCAB, dtype=torch.float32, device="cpu", seed=SEED)
    dev = build_tiny_model(family, vocab_size=TINY_VOCAB, dtype=torch.bfloat16, device=device, seed=SEED)
    ref_p, dev_p = Patcher(ref), Patcher(dev)
    pad = tokens.pad_id_of(tokenizer)
    layer = ref_p.adapter.n_layers // 2

    # (a) mean head outputs; indirect effects of the same mean outputs (the reference's), cached scan
    heads_ref = fv.mean_head_outputs(ref_p, data.clean, pad)
    heads_dev = fv.mean_head_outputs(dev_p, data.clean, pad)
    rel = _rel(heads_dev, heads_ref)
    report.check(family, "mean heads", rel <= T["mean_heads_rel"], f"rel. error {rel:.1e} <= {T['mean_heads_rel']}", rel_error=rel)
    ie_ref = fv.indirect_effects(ref_p, data.corrupted, heads_ref).cpu()
    ie_dev = fv.indirect_effects(dev_p, data.corrupted, heads_ref).cpu()
    _effects_check(report, family, "indirect eff.", ie_dev, ie_ref, "bf16 scan vs fp32 scan")
    loop = fv.indirect_effects_reference(dev_p, data.corrupted, heads_ref).cpu()
    _effects_check(report, family, "scan vs loop", ie_dev, loop, "bf16 scan vs bf16 one forward per head")

    # (b) an FFV trained a few steps from the same start
    initial = fv.assemble_vector(ref_p, heads_ref, fv.top_heads(ie_ref.mean(0), 2)).cpu()
    settings = TrainingSettings(n_pairs=len(data.train_pairs), steps=6, batch_size=4)
    trained_ref = train_function_vector(ref_p, tokenizer, data.train_pairs, layer, initial, settings)
    trained_dev = train_function_vector(dev_p, tokenizer, data.train_pairs, layer, initial, settings)
    step_ref, step_dev = trained_ref.vector - initial, trained_dev.vector - initial
    cos = float(torch.nn.functional.cosine_similarity(step_dev, step_ref, dim=0))
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(trained_dev.losses, trained_ref.losses))
    report.check(family, "FFV training", cos >= T["ffv_cos"] and loss_rel <= T["ffv_loss_rel"],
                 f"cos(update) {cos:.4f} >= {T['ffv_cos']}; max rel. loss diff {loss_rel:.1e} <= {T['ffv_loss_rel']} "
                 f"(loss {trained_ref.losses[0]:.3f} -> {trained_ref.losses[-1]:.3f})",
                 cosine=cos, loss_rel=loss_rel, losses_ref=trained_ref.losses, losses_dev=trained_dev.losses)

    # (c) log-likelihoods and greedy generations through lm-eval with that FFV, scaled to twice
    # the norm of the residual stream where it is added: a trained vector of a random model may
    # be too small to move the scores past the tolerances, and then the check could not tell a
    # patched model from an unpatched one
    norm = residual_norm(ref, data.clean, layer)
    fingerprint = model_fingerprint(ref)
    path = save_vector(workdir / f"{family}.safetensors", trained_ref.vector,
                       {"kind": "ffv", "relation": RELATION, "model_fingerprint": fingerprint, "layer": layer}, force=True)
    scale = 2 * norm / float(trained_ref.vector.norm())
    out_ref = lm_eval_outputs(ref, tokenizer, str(path), scale, data, unpatched_too=True)
    out_dev = lm_eval_outputs(dev, tokenizer, str(path), scale, data)["patched"]
    pat, unp = out_ref["patched"], out_ref["unpatched"]
    ll_rel = max(abs(a - b) / abs(b) for a, b in zip(out_dev["ll"], pat["ll"]))
    moved = max(abs(a - b) / abs(b) for a, b in zip(unp["ll"], pat["ll"]))
    greedy_same = sum(a == b for a, b in zip(out_dev["greedy"], pat["greedy"])) / len(pat["greedy"])
    report.check(family, "patched LL", ll_rel <= T["ll_rel"] and moved > 2 * T["ll_rel"],
                 f"max rel. diff {ll_rel:.1e} <= {T['ll_rel']}; the vector moves them by up to {moved:.2f} (> {2 * T['ll_rel']}); "
                 f"is_greedy equal {greedy_same:.2f}", max_rel_diff=ll_rel, vector_effect_rel=moved, greedy_agreement=greedy_same,
                 ll_ref=pat["ll"], ll_dev=out_dev["ll"])
    agree = sum(_common_prefix_share(a, b) for a, b in zip(out_dev["gen"], pat["gen"])) / len(pat["gen"])
    agree_unpatched = sum(_common_prefix_share(a, b) for a, b in zip(out_dev["gen"], unp["gen"])) / len(unp["gen"])
    report.check(family, "patched gen.", agree >= T["gen_agree"] and agree - agree_unpatched >= T["gen_margin"],
                 f"common prefix share with fp32 patched {agree:.2f} >= {T['gen_agree']}, with fp32 unpatched "
                 f"{agree_unpatched:.2f} (at least {T['gen_margin']} less)", agreement=agree,
                 agreement_with_unpatched=agree_unpatched, ref=pat["gen"], dev=out_dev["gen"], ref_unpatched=unp["gen"])

    # (d) a CFV from a small random basis through the identity map: random directions with the
    # residual stream's norm, so that the posterior is far from uniform
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    n_basis = 6
    directions = torch.randn(n_basis, ref_p.adapter.hidden_size, generator=gen, dtype=torch.float32, device="cpu")
    basis = Basis([f"random-{i}" for i in range(n_basis)], directions / directions.norm(dim=1, keepdim=True) * norm, layer,
                  fingerprint, workdir)
    cmap = CompositeMap(basis, torch.eye(n_basis, dtype=torch.float32, device="cpu"),
                        torch.zeros(n_basis, dtype=torch.float32, device="cpu"), 1.0)
    post_ref = relation_posterior(ref_p, tokenizer, basis, data.stems).cpu()
    post_dev = relation_posterior(dev_p, tokenizer, basis, data.stems).cpu()
    cfv_ref, cfv_dev = cmap.vectors(post_ref), cmap.vectors(post_dev)
    post_err, cfv_rel = _max_abs(post_dev, post_ref), _rel(cfv_dev, cfv_ref)
    spread = float((post_ref.max(dim=1).values - post_ref.min(dim=1).values).min())
    report.check(family, "CFV", post_err <= T["posterior_abs"] and cfv_rel <= T["cfv_rel"] and spread > 2 * T["posterior_abs"],
                 f"posterior max|diff| {post_err:.1e} <= {T['posterior_abs']} (spread {spread:.2f} > {2 * T['posterior_abs']}); "
                 f"CFV rel. error {cfv_rel:.1e} <= {T['cfv_rel']}", posterior_abs=post_err, cfv_rel=cfv_rel, spread=spread)


def _effects_check(report: Report, family: str, name: str, got: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """Indirect effects [N, L, H] against a reference, by the limits in TOLERANCES."""
    from scipy.stats import spearmanr

    T = TOLERANCES
    scale = float(reference.abs().max())
    err = _max_abs(got, reference)
    rho = float(spearmanr(got.flatten().numpy(), reference.flatten().numpy()).statistic)
    top = int(reference.mean(0).flatten().argmax())
    top2 = got.mean(0).flatten().topk(2).indices.tolist()
    ok = scale > 0 and rho >= T["ie_spearman"] and err <= T["ie_abs"] * scale and top in top2
    report.check(family, name, ok, f"{what}: Spearman {rho:.3f} >= {T['ie_spearman']}; max|diff| {err:.1e} <= {T['ie_abs']} x "
                                   f"max|IE| {scale:.1e}; top head {top} in top-2 {top2}",
                 spearman=rho, max_abs_diff=err, max_abs_effect=scale)


# -- part 2: speed on a model shaped like Llama-3-8B --------------------------------------------
def llama3_8b_config(small: bool):
    from transformers import LlamaConfig

    shape = (dict(hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=32) if small else
             dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128))
    return LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)


def build_speed_model(config, device: torch.device):
    """Random bfloat16 weights made where they are used (8B parameters would take minutes
    to initialise on the CPU), transformers' own initialisation (std 0.02)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class SpeedRun:
    """The 8B-shaped model and what one part of the speed run hands the next."""

    model: object
    patcher: object
    tokenizer: object
    relation: object
    device: torch.device
    workdir: Path
    mean_heads: torch.Tensor | None = None
    effects: torch.Tensor | None = None
    vector: torch.Tensor | None = None  # the FFV of the training part, patched in the scoring part


def speed_model(args, device: torch.device, tokenizer, report: Report, workdir: Path) -> SpeedRun:
    from ffv_eval.data.relations import load_project_relation
    from ffv_eval.models.patching import Patcher

    reset_peak(device)
    config = llama3_8b_config(args.small)
    model, seconds = timed(device, lambda: build_speed_model(config, device))
    patcher = Patcher(model)
    a = patcher.adapter
    n_params = sum(p.numel() for p in model.parameters())
    report.figures["speed"] = {"model": {"layers": a.n_layers, "heads": a.n_heads, "hidden": a.hidden_size, "vocab": config.vocab_size,
                                         "parameters": n_params, "build_s": seconds, "peak_mib": peak_mib(device)}}
    print(f"model: {a.n_layers} layers x {a.n_heads} heads, hidden {a.hidden_size}, vocabulary {config.vocab_size}, "
          f"{n_params / 1e9:.2f}B parameters, bfloat16 on {device}; built in {seconds:.1f} s", flush=True)
    return SpeedRun(model, patcher, tokenizer, load_project_relation(RELATION), device, workdir)


def speed_mediation(args, run: SpeedRun, report: Report) -> None:
    """The cached indirect-effect scan of every head on args.prompts 10-shot prompts, against the
    one-forward-per-head loop on args.loop_heads heads of one prompt, extrapolated."""
    from ffv_eval.models import tokens
    from ffv_eval.vectors import function_vectors as fv

    device, patcher, tokenizer, a = run.device, run.patcher, run.tokenizer, run.patcher.adapter
    rng = random.Random(SEED)
    clean = tokens.encode_prompts(tokenizer, *fv.icl_prompts(run.relation.train, 8, 10, rng, False))
    corrupted = tokens.encode_prompts(tokenizer, *fv.icl_prompts(run.relation.train, args.prompts, 10, rng, True))
    mean_tokens = sum(map(len, corrupted.input_ids)) / len(corrupted.input_ids)
    reset_peak(device)
    run.mean_heads = mean_heads = fv.mean_head_outputs(patcher, clean, tokens.pad_id_of(tokenizer))
    one = tokens.PromptSet(corrupted.input_ids[:1], corrupted.answer_ids[:1])
    fv.indirect_effects(patcher, one, mean_heads)  # warm-up
    effects, scan_s = timed(device, lambda: fv.indirect_effects(patcher, corrupted, mean_heads))
    run.effects = effects
    all_heads = [(layer, head) for layer in range(a.n_layers) for head in range(a.n_heads)]
    subset = all_heads[:: max(1, len(all_heads) // args.loop_heads)][: args.loop_heads]
    loop, loop_s = timed(device, lambda: fv.indirect_effects_reference(patcher, one, mean_heads, full_model=True, heads=subset))
    per_forward = loop_s / (len(subset) + 1)  # the loop runs one plain forward for the baseline and one per head
    loop_total = per_forward * (len(all_heads) + 1) * len(corrupted.input_ids)
    rows = [layer * a.n_heads + head for layer, head in subset]
    diff = _max_abs(effects[0].flatten()[rows], loop[0].flatten()[rows])
    m = {"heads": len(all_heads), "prompts": len(corrupted.input_ids), "tokens_per_prompt": mean_tokens, "scan_s": scan_s,
         "loop_heads_timed": len(subset), "loop_timed_s": loop_s, "loop_s_per_forward": per_forward,
         "loop_extrapolated_s": loop_total, "speedup": loop_total / scan_s, "max_abs_diff_subset": diff,
         "max_abs_effect": float(effects.abs().max()), "peak_mib": peak_mib(device)}
    report.figures["speed"]["mediation"] = m
    print(f"indirect effects, {len(all_heads)} heads x {len(corrupted.input_ids)} prompts of ~{mean_tokens:.0f} tokens: cached scan "
          f"{scan_s:.1f} s; one forward per head {per_forward * 1000:.0f} ms/forward ({len(subset)} heads x 1 prompt timed) "
          f"-> {loop_total:.0f} s extrapolated; speed-up {loop_total / scan_s:.0f}x; max|diff| on the subset {diff:.1e} "
          f"(largest effect {m['max_abs_effect']:.1e}); {peak_label(device)} {m['peak_mib']:.0f} MiB", flush=True)


def speed_training(args, run: SpeedRun, report: Report) -> None:
    """FFV training steps per second, batch 4, from the top-10 heads' FV (a random start if the
    mediation part failed)."""
    from ffv_eval.vectors import function_vectors as fv
    from ffv_eval.vectors.fine_tuning import TrainingSettings, random_like, train_function_vector

    device, a = run.device, run.patcher.adapter
    reset_peak(device)
    layer = a.n_layers // 2
    if run.effects is not None:
        initial = fv.assemble_vector(run.patcher, run.mean_heads, fv.top_heads(run.effects.mean(0), 10)).cpu()
    else:
        initial = random_like(torch.ones(a.hidden_size, dtype=torch.float32, device="cpu"), SEED)
    pairs = list(run.relation.train[:20])
    train_function_vector(run.patcher, run.tokenizer, pairs, layer, initial, TrainingSettings(steps=2, batch_size=4))  # warm-up
    result, train_s = timed(device, lambda: train_function_vector(run.patcher, run.tokenizer, pairs, layer, initial,
                                                                 TrainingSettings(steps=args.train_steps, batch_size=4)))
    run.vector = result.vector
    t = {"steps": args.train_steps, "batch_size": 4, "layer": layer, "seconds": train_s, "steps_per_s": args.train_steps / train_s,
         "first_loss": result.losses[0], "last_loss": result.losses[-1], "peak_mib": peak_mib(device)}
    report.figures["speed"]["training"] = t
    print(f"FFV training, batch 4, vector after block {layer}: {args.train_steps} steps in {train_s:.2f} s = "
          f"{t['steps_per_s']:.1f} steps/s (loss {result.losses[0]:.2f} -> {result.losses[-1]:.2f}); "
          f"{peak_label(device)} {t['peak_mib']:.0f} MiB", flush=True)


def speed_scoring(args, run: SpeedRun, report: Report) -> None:
    """lm-eval log-likelihood requests (one-shot analogies of the relation's pairs): HFLM
    (`--model hf`) against `ffv-patched` without a vector (the same scores, bit for bit) and
    with the trained FFV; all three wrap the same model instance."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from ffv_eval.harness.model import FFVPatchedLM
    from ffv_eval.models.loading import model_fingerprint
    from ffv_eval.vectors.composite_fit import one_shot_prompt
    from ffv_eval.vectors.fine_tuning import random_like
    from ffv_eval.vectors.store import save_vector

    device, model, tokenizer, a = run.device, run.model, run.tokenizer, run.patcher.adapter
    reset_peak(device)
    rng = random.Random(SEED)
    requests = []
    for _ in range(args.requests):
        p, q = rng.sample(list(run.relation.train), 2)
        requests.append((one_shot_prompt(p.input, p.output, q.input), " " + q.output))
    vector = run.vector if run.vector is not None else random_like(torch.ones(a.hidden_size, dtype=torch.float32, device="cpu"), SEED)
    path = save_vector(run.workdir / "speed.safetensors", vector, {"kind": "ffv", "relation": RELATION, "layer": a.n_layers // 2,
                                                                   "model_fingerprint": model_fingerprint(model)}, force=True)

    def score(lm):
        best, lls = None, None
        for _ in range(args.repeats):
            instances = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]
            out, seconds = timed(device, lambda instances=instances: lm.loglikelihood(instances, disable_tqdm=True))
            best, lls = (seconds if best is None else min(best, seconds)), [x for x, _ in out]
        return best, lls

    hf_s, hf_ll = score(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size))
    patched = FFVPatchedLM(pretrained=model, vector="none", tokenizer=tokenizer, batch_size=args.batch_size)
    plain_s, plain_ll = score(patched)
    patched.set_vector(str(path))
    vec_s, vec_ll = score(patched)
    same = max(abs(x - y) for x, y in zip(hf_ll, plain_ll))
    moved = max(abs(x - y) for x, y in zip(hf_ll, vec_ll))
    sc = {"requests": len(requests), "batch_size": args.batch_size, "repeats": args.repeats, "hf_s": hf_s,
          "ffv_patched_no_vector_s": plain_s, "ffv_patched_vector_s": vec_s, "ratio_vector_over_hf": vec_s / hf_s,
          "max_abs_ll_diff_no_vector": same, "max_abs_ll_change_by_vector": moved, "peak_mib": peak_mib(device)}
    report.figures["speed"]["scoring"] = sc
    print(f"lm-eval scoring, {len(requests)} log-likelihood requests, batch {args.batch_size}, best of {args.repeats}: hf {hf_s:.2f} s; "
          f"ffv-patched without a vector {plain_s:.2f} s, with one {vec_s:.2f} s; ratio with a vector / hf {vec_s / hf_s:.2f}; "
          f"{peak_label(device)} {sc['peak_mib']:.0f} MiB", flush=True)
    report.check(SPEED_MODEL, "hf parity", same == 0.0,
                 f"ffv-patched without a vector vs --model hf: max|diff| {same:.1e} (must be 0: the same HFLM code path)",
                 max_abs_diff=same)
    report.check(SPEED_MODEL, "vector acts", moved > 0.0, f"the vector changes the log-likelihoods by up to {moved:.2e}",
                 max_abs_change=moved)


# -- the command line ---------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU only, the 8B-shaped model shrunk (automatic without CUDA)")
    parser.add_argument("--out", help="write every figure and check as JSON to this file")
    parser.add_argument("--families", help="comma-separated tiny model families to check (default: all)")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--prompts", type=int, default=25, help="shuffled-label 10-shot prompts of the indirect-effect scan")
    parser.add_argument("--loop-heads", type=int, default=32, help="heads timed with one forward each (1 prompt)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--requests", type=int, help="synthetic lm-eval log-likelihood requests (default 300; --small 96)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, help="timed scoring runs per side, the fastest counts (default 2; --small 1)")
    args = parser.parse_args(argv)

    from ffv_eval.models.tiny import FAMILY_NAMES

    args.families = FAMILY_NAMES if not args.families else tuple(f.strip() for f in args.families.split(",") if f.strip())
    unknown = [f for f in args.families if f not in FAMILY_NAMES]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(FAMILY_NAMES)}")
    for name in ("prompts", "loop_heads", "train_steps", "requests", "batch_size", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.out:
        parent = Path(args.out).resolve().parent
        if not parent.is_dir():
            parser.error(f"--out {args.out}: folder {parent} does not exist; create it or write elsewhere")
    if not torch.cuda.is_available() and not args.small:
        print("no CUDA device: running --small on the CPU", flush=True)
        args.small = True
    for name, gpu, small in (("requests", 300, 96), ("repeats", 2, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else gpu)
    return args


def guarded(report: Report, family: str, part: str, fn: Callable, *args):
    """fn(*args), timed into report.elapsed; an exception becomes a FAIL (with its traceback on
    stderr) and the run goes on, so that one broken family or part costs no other figure."""
    t = time.perf_counter()
    try:
        return fn(*args)
    except Exception as err:  # a check harness: every failure is reported, none stops the run
        traceback.print_exc()
        report.check(family, part, False, f"crashed: {type(err).__name__}: {err}"[:400], error=repr(err)[:2000])
        return None
    finally:
        report.elapsed[f"{family}: {part}"] = time.perf_counter() - t
        report.save()


def main(argv=None) -> int:
    args = parse_args(argv)
    lm_eval_logger = logging.getLogger("lm_eval")
    level = lm_eval_logger.level
    lm_eval_logger.setLevel(logging.ERROR)  # HFLM warns at every model instance it is given
    try:
        return run(args)
    finally:
        lm_eval_logger.setLevel(level)


def run(args) -> int:
    device = torch.device("cpu" if args.small else "cuda")
    torch.manual_seed(SEED)
    report = Report(args)
    start = time.perf_counter()
    tokenizer = pair_tokenizer()
    what = "--small: CPU bfloat16 against CPU float32" if args.small else f"{torch.cuda.get_device_name(0)} bfloat16 against CPU float32"
    print(f"gpu_check: {what}; tokenizer: byte-level BPE of {len(tokenizer)} tokens from the project's word pairs", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        workdir = Path(tmp)
        if not args.skip_correctness:
            t = time.perf_counter()
            reset_peak(device)
            data = check_data(tokenizer)
            print(f"== correctness: {len(args.families)} families, bfloat16 on {device} against float32 on the CPU", flush=True)
            for family in args.families:
                guarded(report, family, "correctness", check_family, family, device, tokenizer, data, report, workdir)
            report.elapsed["correctness"] = time.perf_counter() - t
            report.figures["correctness_peak_mib"] = peak_mib(device)
            print(f"correctness: {report.elapsed['correctness']:.0f} s; {peak_label(device)} "
                  f"{report.figures['correctness_peak_mib']:.0f} MiB", flush=True)
        if not args.skip_speed:
            t = time.perf_counter()
            print(f"== speed: Llama-3-8B shape{' (shrunk: --small)' if args.small else ''}, bfloat16 on {device}", flush=True)
            state = guarded(report, SPEED_MODEL, "build", speed_model, args, device, tokenizer, report, workdir)
            if state is not None:
                for part, fn in (("mediation", speed_mediation), ("training", speed_training), ("scoring", speed_scoring)):
                    guarded(report, SPEED_MODEL, part, fn, args, state, report)
                    print(f"   [{part}: {report.elapsed[f'{SPEED_MODEL}: {part}']:.0f} s]", flush=True)
            report.elapsed["speed"] = time.perf_counter() - t
    report.elapsed["total"] = time.perf_counter() - start
    report.save()
    failed = [c for c in report.checks if not c.passed]
    print(f"== {len(report.checks) - len(failed)}/{len(report.checks)} checks passed"
          + (f"; FAILED: {', '.join(f'{c.family} {c.name}' for c in failed)}" if failed else "")
          + f"; total {report.elapsed['total']:.0f} s" + (f"; figures in {args.out}" if args.out else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
