"""The CFV posteriors behind `ffv explain-cfv`: the model loaded with a basis and its map, the top
basis relations of each source pair's composite vector. The report itself (reports.cfv_evidence)
reads results only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ffv_eval.reports.cfv_evidence import Posteriors, explain_cfv


def cfv_posteriors(model: str, stems: Sequence[tuple[str, str]], top: int, basis_dir=None, placement=None) -> Posteriors:
    """The top basis relations, posterior and weight, of each source pair's CFV: the model
    loaded, the fitted map of `basis_dir` (None: the model's own), CompositeVectors.explain."""
    from ffv_eval.models.loading import load_model_and_tokenizer, model_fingerprint
    from ffv_eval.models.patching import Patcher
    from ffv_eval.vectors.composite import CompositeVectors, model_composite_map

    loaded, tokenizer = load_model_and_tokenizer(model, placement=placement)
    fingerprint = model_fingerprint(loaded)
    cmap = model_composite_map(model, fingerprint, basis_dir)
    composite = CompositeVectors(Patcher(loaded), tokenizer, cmap)
    composite.prepare(list(stems))  # batched
    return Posteriors({stem: composite.explain(*stem, top) for stem in stems}, Path(cmap.basis.directory),
                      cmap.posterior_kind, fingerprint)


def explain_cfv_with_model(*args, **kwargs) -> str:
    """`ffv explain-cfv`: reports.cfv_evidence.explain_cfv with the posteriors of the loaded model."""
    return explain_cfv(*args, posteriors_of=cfv_posteriors, **kwargs)
