#!/usr/bin/env bash
# Wheels for bench/gpu_check.py on a CUDA machine that reaches no package index: run it here,
# where PyPI works, from anywhere in the checkout. It downloads into <checkout>/.whl (kept out
# of git through .git/info/exclude) the packages that the machine's image lacks, at the
# versions installed here (pip show), for CPython 3.12 on x86-64 Linux, and prints the size
# and the command that installs them there.
#
# The image (torch 2.11 + CUDA, transformers 5.17, accelerate, scipy, tokenizers, safetensors,
# numpy, pyyaml, tqdm, httpx, cloudpickle, huggingface-hub 1.x, ...) lacks lm-eval, nnsight and
# what they import on the way to HFLM and nnsight's tracing: pydantic (+ pydantic-core,
# annotated-types, typing-inspection) and greenlet. lm-eval's other requirements (datasets,
# evaluate, sqlitedict, pytablewriter, ...) are imported only by its evaluator and tasks, which
# gpu_check does not use; installing with --no-deps leaves them out.
#
# transformers itself is carried too (about 12 MB), at this machine's version, so that the GPU
# runs the modelling code the CPU tests run; --device-transformers leaves it out and uses the
# image's own.
#
#     bash bench/gpu_wheels.sh [--device-transformers]
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

PACKAGES=(lm-eval nnsight pydantic pydantic-core annotated-types typing-inspection greenlet)
case "${1:-}" in
  "") PACKAGES+=(transformers) ;;
  --device-transformers) ;;
  *) echo "usage: bash bench/gpu_wheels.sh [--device-transformers]" >&2; exit 2 ;;
esac

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")" .whl
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
rm -f .whl/*.whl

for name in "${PACKAGES[@]}"; do
  version="$(python3 -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')"
  if [ -z "$version" ]; then
    echo "gpu_wheels: $name is not installed here; install the project first (pip install -e .)" >&2
    exit 1
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$version"
done

ls -l .whl
echo "total: $(du -ch .whl/*.whl | tail -1 | cut -f1) in $(ls .whl/*.whl | wc -l) wheels"
echo "on the CUDA machine, from the checkout:"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site"
