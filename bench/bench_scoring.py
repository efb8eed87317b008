"""Benchmark: patched scoring against stock lm-eval. One lm-eval log-likelihood task at one batch
size, in one process, side by side: `--model hf` (no vector), `ffv-patched` without a vector
(scores must be identical), and `ffv-patched` with a vector, on the same device (CUDA when there
is one). Prints the times, the ratio patched / hf (target <= 1.0) and peak memory (on CUDA the
most GPU memory allocated, per side; on the CPU the process's peak RSS, which only grows).

    FFV_DATA_DIR=../shared/data python bench/bench_scoring.py --task u2_analogy --limit 100
"""

from __future__ import annotations

import argparse
import time

from peak_memory import peak_text, reset_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--task", default="u2_analogy")
    parser.add_argument("--vector", default="antonym")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per condition (the fastest counts)")
    args = parser.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from ffv_eval.harness.model import FFVPatchedLM
    from ffv_eval.models.loading import default_device, resolve_pretrained

    def score(lm):
        best, out = None, None
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = lm_eval.simple_evaluate(model=lm, tasks=[args.task], limit=args.limit, log_samples=True, random_seed=0,
                                          numpy_random_seed=0, torch_random_seed=0)
            seconds = time.perf_counter() - t
            best = seconds if best is None else min(best, seconds)
        lls = [r[0][0] for s in out["samples"][args.task] for r in s["resps"]]
        return best, out["results"][args.task], lls

    device = default_device()
    reset_peak(device)
    hf = HFLM(pretrained=resolve_pretrained(args.model), device=device, batch_size=args.batch_size)
    hf_s, hf_res, hf_ll = score(hf)
    hf_mem = peak_text(device)
    del hf
    reset_peak(device)
    patched = FFVPatchedLM(pretrained=args.model, vector="none", device=device, batch_size=args.batch_size)
    plain_s, plain_res, plain_ll = score(patched)
    patched.set_vector(args.vector)
    vec_s, vec_res, _ = score(patched)
    n = len(hf_ll)
    print(f"{args.model}, task {args.task}, {n} log-likelihood requests, batch size {args.batch_size}, best of {args.repeats}")
    print(f"hf, no vector:                   {hf_s:7.2f} s   acc {hf_res['acc,none']:.3f}   {hf_mem}")
    print(f"ffv-patched, no vector:          {plain_s:7.2f} s   acc {plain_res['acc,none']:.3f}")
    print(f"ffv-patched, vector {args.vector}:  {vec_s:7.2f} s   acc {vec_res['acc,none']:.3f}   {peak_text(device)}")
    print(f"ratio patched / hf: {vec_s / hf_s:.2f} (target <= 1.0); unpatched / hf: {plain_s / hf_s:.2f}")
    print(f"max |log-likelihood difference| ffv-patched (no vector) vs hf: {max(abs(a - b) for a, b in zip(hf_ll, plain_ll)):.2e}; "
          f"same acc: {hf_res['acc,none'] == plain_res['acc,none']}")


if __name__ == "__main__":
    main()
