"""Every benchmark of the project, each in its own process (so each peak memory is its own),
printed one after the other: causal mediation (cached scan vs the straightforward loop),
patched scoring (ffv-patched vs --model hf), FFV training (one relation vs many per pass) and
composite vectors (the batched posterior; a CFV run vs the unpatched run, on a multiple-choice and
a completion set).

    FFV_DATA_DIR=../shared/data python bench/run_all.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    ("causal mediation", ["bench_mediation.py", "--prompts", "1"]),
    ("patched scoring", ["bench_scoring.py", "--task", "u2_analogy", "--limit", "50", "--repeats", "1"]),
    ("FFV training", ["bench_training.py", "--relations", "4", "--steps", "20"]),
    ("composite vectors", ["bench_composite.py", "--task", "u2_analogy", "--limit", "50", "--stems", "32"]),
    ("composite vectors, a completion set", ["bench_composite.py", "--task", "analogy_completion_semeval", "--limit", "80", "--stems", "8"]),
]


def main() -> int:
    failed = 0
    for title, (script, *args) in BENCHMARKS:
        print(f"== {title}: {script} {' '.join(args)}", flush=True)
        done = subprocess.run([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, text=True)
        print(done.stdout.strip() or "(no output)", flush=True)
        failed += done.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
