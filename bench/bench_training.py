"""Benchmark: FFV training one relation at a time against several relations sharing each forward
pass (as `ffv basis build` does). Same relations, same settings; prints the time per relation of
both, the ratio, the largest difference between the vectors, and peak memory.

    python bench/bench_training.py --relations 8 --steps 30
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from peak_memory import peak_text, reset_peak

from ffv_eval.data.relations import load_relation, project_relations
from ffv_eval.models.loading import input_device, load_model_and_tokenizer
from ffv_eval.models.patching import Patcher
from ffv_eval.vectors.fine_tuning import TrainingSettings, train_function_vector, train_function_vectors
from ffv_eval.vectors.library import shipped_path
from ffv_eval.vectors.store import load_vector


def main() -> None:
    os.environ.pop("FFV_DATA_DIR", None)  # the project's word pairs, whatever the caller's data directory
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--relations", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    model, tok = load_model_and_tokenizer(args.model)
    patcher = Patcher(model)
    device = input_device(model)
    reset_peak(device)
    names = project_relations()[: args.relations]
    fvs = [load_vector(shipped_path(args.model, "fv", n)) for n in names]
    layer = fvs[0].metadata["layer"]  # one layer for all, as in a basis
    pairs = [load_relation(n).train[:20] for n in names]
    initials = torch.stack([v.vector for v in fvs])
    settings = TrainingSettings(steps=args.steps)

    t = time.perf_counter()
    alone = [train_function_vector(patcher, tok, p, layer, v, settings) for p, v in zip(pairs, initials)]
    alone_s = (time.perf_counter() - t) / len(names)
    t = time.perf_counter()
    together = train_function_vectors(patcher, tok, pairs, layer, initials, settings)
    together_s = (time.perf_counter() - t) / len(names)
    diff = max(float((a.vector - b.vector).abs().max() / a.vector.abs().max()) for a, b in zip(alone, together))
    print(f"{args.model}: {len(names)} relations, {args.steps} steps of batch {settings.batch_size} per relation, {torch.get_num_threads()} threads")
    print(f"one relation at a time: {alone_s:6.2f} s per relation")
    print(f"{len(names)} relations per pass:  {together_s:6.2f} s per relation")
    print(f"speed-up {alone_s / together_s:.1f}x; largest relative difference between the vectors {diff:.1e}; "
          f"{peak_text(device)}")


if __name__ == "__main__":
    main()
