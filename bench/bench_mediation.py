"""Benchmark: the indirect-effect scan of causal mediation, one full forward pass per head per
prompt (the straightforward loop) against the key/value-cached, head-batched scan, on the same
prompts of the same model. Prints both times, the ratio, the largest difference between their
indirect effects, and peak memory.

    python bench/bench_mediation.py --model gemma-3-270m --prompts 2
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from peak_memory import peak_text, reset_peak

from ffv_eval.data.relations import load_relation
from ffv_eval.models import tokens
from ffv_eval.models.loading import input_device, load_model_and_tokenizer
from ffv_eval.models.patching import Patcher
from ffv_eval.vectors import function_vectors as fv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--relation", default="antonym")
    parser.add_argument("--prompts", type=int, default=2, help="shuffled-label prompts scanned by both methods")
    parser.add_argument("--head-batch", type=int, default=128)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model, tok = load_model_and_tokenizer(args.model)
    patcher = Patcher(model)
    device = input_device(model)
    reset_peak(device)
    relation = load_relation(args.relation)
    rng = random.Random(0)
    clean = tokens.encode_prompts(tok, *fv.icl_prompts(relation.train, 8, 10, rng, False))
    mean_heads = fv.mean_head_outputs(patcher, clean, tokens.pad_id_of(tok))
    corrupted = tokens.encode_prompts(tok, *fv.icl_prompts(relation.train, args.prompts, 10, rng, True))
    fv.indirect_effects(patcher, tokens.PromptSet(corrupted.input_ids[:1], corrupted.answer_ids[:1]), mean_heads)  # warm-up

    t = time.perf_counter()
    fast = fv.indirect_effects(patcher, corrupted, mean_heads, args.head_batch)
    fast_s = time.perf_counter() - t
    t = time.perf_counter()
    slow = fv.indirect_effects_reference(patcher, corrupted, mean_heads)
    slow_s = time.perf_counter() - t
    t = time.perf_counter()
    full = fv.indirect_effects_reference(patcher, corrupted, mean_heads, full_model=True)
    full_s = time.perf_counter() - t

    a = patcher.adapter
    mean_tokens = sum(len(ids) for ids in corrupted.input_ids) / len(corrupted.input_ids)
    print(f"model {args.model}: {a.n_layers} layers x {a.n_heads} heads, {args.prompts} prompts of ~{mean_tokens:.0f} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"straightforward loop, plain forward (all-position logits): {full_s:8.2f} s  ({full_s / args.prompts:.2f} s/prompt)")
    print(f"straightforward loop, last-position logits only:           {slow_s:8.2f} s  ({slow_s / args.prompts:.2f} s/prompt)")
    print(f"cached, head-batched scan:                                 {fast_s:8.2f} s  ({fast_s / args.prompts:.2f} s/prompt)")
    print(f"speed-up over the plain loop: {full_s / fast_s:.1f}x, over the last-position loop: {slow_s / fast_s:.1f}x")
    print(f"max |difference| of indirect effects: {(fast - full).abs().max():.2e} (plain loop), {(fast - slow).abs().max():.2e} (last-position loop)")
    print(peak_text(device))


if __name__ == "__main__":
    main()
