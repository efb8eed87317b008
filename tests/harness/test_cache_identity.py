"""The identity under which ffv-patched keeps a patched run's responses in lm-eval's response
cache (FFVPatchedLM._vector_identity), without a model: everything that changes a CFV changes it."""

from pathlib import Path

import torch


def test_the_response_cache_keeps_cfv_maps_apart_that_differ_only_in_how_the_posterior_is_read():
    """Two maps with the same basis, weight and bias but another posterior, top_k, no-relation
    margin or relation baseline give other CFVs: the cache identity tells them apart."""
    from dataclasses import replace
    from types import SimpleNamespace

    from ffv_eval.harness.model import FFVPatchedLM
    from ffv_eval.vectors.basis import Basis
    from ffv_eval.vectors.composite import CompositeMap

    basis = Basis(["r0", "r1", "r2"], torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), 2, "f" * 16, Path("."))
    cmap = CompositeMap(basis, torch.eye(3), torch.zeros(3), 1.0)
    variants = [cmap, replace(cmap, top_k=1), replace(cmap, no_relation=2.0), replace(cmap, no_relation=4.0),
                replace(cmap, posterior_kind="calibrated", relation_baseline=torch.zeros(3)),
                replace(cmap, posterior_kind="calibrated", relation_baseline=torch.ones(3))]

    def identity(m):
        lm = SimpleNamespace(per_task=None, stored_vector=None, composite=SimpleNamespace(cmap=m), fingerprint="f" * 16,
                             patch_layer=2, patch_scale=1.0)
        return FFVPatchedLM._vector_identity(lm)

    names = [identity(m) for m in variants]
    assert len(set(names)) == len(variants) and identity(replace(cmap)) == names[0]
