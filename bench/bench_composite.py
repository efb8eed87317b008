"""Benchmark: composite vectors (CFV). Two measurements, in one process:

1. The posterior: log P(B | A, FFV_r) for every source pair and basis relation, batched across
   source pairs (the default) against one source pair per pass (the loop it replaced), with the
   largest difference between the two (they compute the same thing).
2. A whole lm-eval task: the unpatched model (vector=none) against vector=cfv on the same
   questions, wall time of each and the ratio (target: CFV <= 2x unpatched).

    FFV_DATA_DIR=../shared/data python bench/bench_composite.py --task u2_analogy --limit 100
"""

from __future__ import annotations

import argparse
import time

from peak_memory import peak_text, reset_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--task", default="u2_analogy")
    parser.add_argument("--limit", type=int, default=100, help="questions of the task (0: the whole test set)")
    parser.add_argument("--stems", type=int, default=32, help="source pairs timed in the posterior benchmark")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import lm_eval
    import torch

    from ffv_eval.data.analogies import load_analogy_questions
    from ffv_eval.harness.model import FFVPatchedLM
    from ffv_eval.models.loading import default_device
    from ffv_eval.vectors import composite, scoring

    device = default_device()
    lm = FFVPatchedLM(pretrained=args.model, vector="cfv", device=device, batch_size=args.batch_size)
    basis = lm.composite.cmap.basis
    stems = list(dict.fromkeys(tuple(q["stem"]) for q in load_analogy_questions("u4", "test")))[: args.stems]

    def posterior_seconds(rows_per_pass: int, top=None) -> tuple[float, torch.Tensor]:
        saved, scoring.ROWS_PER_PASS = scoring.ROWS_PER_PASS, rows_per_pass
        try:
            t = time.perf_counter()
            out = composite.basis_logprobs(lm.patcher, lm.tokenizer, basis, stems, with_baseline=True, top=top)
            return time.perf_counter() - t, out
        finally:
            scoring.ROWS_PER_PASS = saved

    n_rows = len(basis.names) + 1
    one_s, one = posterior_seconds(n_rows)  # one source pair per pass
    batched_s, batched = posterior_seconds(scoring.ROWS_PER_PASS)
    print(f"{args.model}, {len(stems)} source pairs x {n_rows} rows ({len(basis.names)} basis relations + no vector)")
    print(f"posterior, one source pair per pass: {one_s:7.2f} s ({one_s / len(stems) * 1000:.0f} ms per pair)")
    print(f"posterior, batched ({scoring.ROWS_PER_PASS} rows per pass): {batched_s:7.2f} s "
          f"({batched_s / len(stems) * 1000:.0f} ms per pair), {one_s / batched_s:.2f}x; "
          f"max |difference| {float((one - batched).abs().max()):.2e}")
    cmap = lm.composite.cmap
    if cmap.top_rows() is not None:  # the shipped map keeps its top_k relations: only they are unembedded in full
        bounded_s, bounded = posterior_seconds(scoring.ROWS_PER_PASS, cmap.top_rows())
        same = torch.equal(cmap.posterior(bounded), cmap.posterior(batched))
        print(f"posterior, batched, top_k {cmap.top_k} bounded: {bounded_s:7.2f} s ({bounded_s / len(stems) * 1000:.0f} ms per pair), "
              f"{batched_s / bounded_s:.2f}x faster than batched; posteriors {'identical' if same else 'DIFFERENT'}")

    def run() -> tuple[float, dict]:
        t = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[args.task], limit=args.limit or None, random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, bootstrap_iters=0)
        return time.perf_counter() - t, out["results"][args.task]

    reset_peak(device)
    lm.composite._cache.clear()  # the CFV run computes every posterior it needs
    cfv_s, cfv = run()
    cfv_mem = peak_text(device)
    lm.set_vector(None)
    plain_s, plain = run()
    print(f"{args.task}, limit {args.limit or 'none'}, batch size {args.batch_size}:")

    def metrics(results: dict) -> str:  # the task's own metrics (acc, acc_d; exact_match on completion sets)
        return "   ".join(f"{k.split(',')[0]} {v:.3f}" for k, v in results.items()
                           if isinstance(v, float) and "_stderr" not in k)

    print(f"unpatched (vector=none): {plain_s:7.2f} s   {metrics(plain)}")
    print(f"vector=cfv:              {cfv_s:7.2f} s   {metrics(cfv)}   {cfv_mem}")
    print(f"ratio cfv / unpatched: {cfv_s / plain_s:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
