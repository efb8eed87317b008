"""The basis of a composite function vector: one FFV per relation, every one at the same layer,
trained from a cheap FV start (the model's function heads, read off its shipped FVs, averaged
over a few in-context prompts of the relation) on that relation's word pairs. Built in groups
of relations that share forward passes, cached on disk one vector per relation, reused.

Layout: <basis dir>/<source>/<relation>.safetensors (+ .json sidecar, kind "basis").
Default basis dir: ./vectors/<model alias>/basis to build, then the shipped one to read
(vectors.library)."""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ffv_eval import VECTORS_DIR, __version__
from ffv_eval.data.basis_sources import BasisRelation
from ffv_eval.files.hashes import pairs_sha256
from ffv_eval.models.loading import input_device
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tokens import encode_prompts, pad_id_of
from ffv_eval.progress import no_progress
from ffv_eval.vectors.fine_tuning import TrainingSettings, train_function_vectors
from ffv_eval.vectors.function_vectors import ICL_SHOTS, icl_prompts, mean_head_outputs
from ffv_eval.vectors.library import BasisError, basis_output_dir, basis_vector_file, kind_dir, model_vectors
from ffv_eval.vectors.scoring import first_token_scores
from ffv_eval.vectors.store import VectorFileError, load_vector, save_vector

BASIS_KIND = "basis"


@dataclass(frozen=True)
class BasisSettings:
    n_pairs: int = 20  # training pairs per relation (fewer if a relation has fewer)
    steps: int = 60
    batch_size: int = 4  # pairs per relation per step
    relations_per_pass: int = 16  # relations trained together in one forward pass
    init_prompts: int = 8  # in-context prompts averaged for the starting FV
    n_shots: int = ICL_SHOTS
    seed: int = 0
    # The basis FFVs' loss (vectors.fine_tuning.LOSSES): the answer's tokens, as the shipped bases
    # were trained (the library's default became "answer-newline" after they were built, chosen on
    # relation tasks that stop at a newline; the CFV's settings were chosen for these vectors).
    loss: str = "answer"
    # The block the basis FFVs are added after (None: the most common layer of the model's shipped
    # FFVs, function_heads). Its starting vectors are the same function heads' mean outputs.
    layer: int | None = None

    def __post_init__(self):
        """A bad layer fails when the settings are made; build_basis checks it against the model."""
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise BasisError(f"basis layer {self.layer!r}: expected a block index >= 0")


@dataclass(frozen=True)
class FunctionHeads:
    """Where a model's FVs live, read off its shipped FVs: the heads, the layer the vectors are
    added after, and their scale."""

    heads: tuple[tuple[int, int], ...]
    layer: int
    scale: float


@dataclass
class Basis:
    names: list[str]
    vectors: torch.Tensor  # [R, hidden], float32 (on the CPU as loaded; users move them to the model)
    layer: int
    model_fingerprint: str
    directory: Path

    def without(self, names) -> Basis:
        """The basis less the relations `names` (kept in order): a basis that has never seen them."""
        keep = [i for i, n in enumerate(self.names) if n not in set(names)]
        if not keep:
            raise BasisError(f"basis {self.directory}: nothing left once {len(set(names))} relations are held out")
        return Basis([self.names[i] for i in keep], self.vectors[keep], self.layer, self.model_fingerprint, self.directory)


def function_heads(model_alias: str, vectors_dir: Path = VECTORS_DIR) -> FunctionHeads:
    """The heads with the largest summed indirect effect over the model's shipped FVs (as many
    as the median FV uses), the most common layer of its shipped FFVs, the median FV scale."""
    fvs = [load_vector(p).metadata for p in model_vectors(model_alias, "fv", root=vectors_dir)]
    if not fvs:
        raise BasisError(f"no shipped FVs for {model_alias} in {kind_dir(vectors_dir, model_alias, 'fv')}; "
                         f"run: ffv build-library --model {model_alias}")
    effect: Counter = Counter()
    for meta in fvs:
        for h in meta.get("heads", []):
            effect[(h["layer"], h["head"])] += h["indirect_effect"]
    k = max(1, int(statistics.median(len(m.get("heads", [])) for m in fvs)))
    ffvs = [load_vector(p).metadata for p in model_vectors(model_alias, "ffv", root=vectors_dir)] or fvs
    layers = Counter(m["layer"] for m in ffvs)
    layer = min(layers, key=lambda n: (-layers[n], n))
    return FunctionHeads(tuple(h for h, _ in effect.most_common(k)), layer, float(statistics.median(m["scale"] for m in fvs)))


@torch.no_grad()
def starting_vector(patcher: Patcher, tokenizer, relation: BasisRelation, heads: FunctionHeads, settings: BasisSettings) -> torch.Tensor:
    """The function heads' mean outputs over a few in-context prompts of the relation, in the
    residual basis, times the model's usual FV scale."""
    rng = random.Random(f"{settings.seed}:{relation.name}")
    shots = min(settings.n_shots, len(relation.pairs) - 1)
    prompts = encode_prompts(tokenizer, *icl_prompts(relation.pairs, settings.init_prompts, shots, rng, False))
    mean_heads = mean_head_outputs(patcher, prompts, pad_id_of(tokenizer))
    vector = torch.zeros(patcher.adapter.hidden_size, dtype=torch.float32, device=input_device(patcher.model))
    for layer, head in heads.heads:
        vector += patcher.adapter.head_contributions(layer, mean_heads[layer])[head].to(vector.device, torch.float32)
    return vector * heads.scale


def build_basis(
    patcher: Patcher,
    tokenizer,
    model_alias: str,
    fingerprint: str,
    relations: Sequence[BasisRelation],
    directory: Path | None = None,
    settings: BasisSettings = BasisSettings(),
    force: bool = False,
    progress: Callable[[str], None] = no_progress,
) -> Basis:
    """Train the basis FFVs that are missing from `directory` (all of them with `force`) and
    return the whole basis. A cached vector made from other pairs or another model is an error
    unless `force`."""
    if not relations:
        raise BasisError("empty basis: no relations given")
    directory = Path(directory or basis_output_dir(model_alias))
    heads = function_heads(model_alias)
    if settings.layer is not None:
        if settings.layer >= patcher.adapter.n_layers:
            raise BasisError(f"basis layer {settings.layer}: {model_alias} has blocks 0..{patcher.adapter.n_layers - 1}")
        heads = dataclasses.replace(heads, layer=settings.layer)
    missing = []
    for relation in relations:
        path = basis_vector_file(directory, relation.name)
        if path.exists() and not force:
            _check_cached(load_vector(path), relation, fingerprint, heads.layer)
        else:
            missing.append(relation)
    progress(f"[ffv] basis for {model_alias}: {len(relations)} relations, {len(relations) - len(missing)} cached, "
             f"{len(missing)} to train at layer {heads.layer} (heads {', '.join(f'L{layer}H{h}' for layer, h in heads.heads)}, x{heads.scale:g})")
    # scale 1: the CFV's map chooses how strongly the basis vectors are added (its own scale,
    # chosen on validation questions), not the relation FFVs' scale
    training = TrainingSettings(n_pairs=settings.n_pairs, steps=settings.steps, batch_size=settings.batch_size, seed=settings.seed,
                                loss=settings.loss, scale=1.0)
    bar = tqdm(total=len(missing), unit="relation", desc=f"basis {model_alias}", disable=None if missing else True)
    for start in range(0, len(missing), settings.relations_per_pass):
        group = missing[start : start + settings.relations_per_pass]
        t = time.perf_counter()
        bar.set_postfix_str(f"{group[0].name} .. {group[-1].name}")
        initials = torch.stack([starting_vector(patcher, tokenizer, r, heads, settings) for r in group])
        pair_lists = [r.pairs[: settings.n_pairs] for r in group]
        results = train_function_vectors(patcher, tokenizer, pair_lists, heads.layer, initials, training)
        before, _ = _training_fit(patcher, tokenizer, pair_lists, heads.layer, initials)
        after, _ = _training_fit(patcher, tokenizer, pair_lists, heads.layer, torch.stack([r.vector for r in results]))
        for relation, result, fit0, fit1 in zip(group, results, before, after):
            save_vector(basis_vector_file(directory, relation.name), result.vector, {
                "kind": BASIS_KIND, "relation": relation.name, "source": relation.source, "origin": relation.origin,
                "model": model_alias, "model_fingerprint": fingerprint, "layer": heads.layer, "scale": 1.0,
                "heads": [{"layer": layer, "head": h} for layer, h in heads.heads], "init_scale": heads.scale,
                "data": {"pairs_sha256": pairs_sha256(relation.pairs), "n_pairs": len(relation.pairs),
                         "training_pairs": len(relation.pairs[: settings.n_pairs])},
                "settings": dataclasses.asdict(settings),
                "metrics": {"training_first_token_accuracy": fit1, "training_first_token_accuracy_at_init": fit0,
                            "first_loss": result.losses[0], "last_loss": sum(result.losses[-10:]) / len(result.losses[-10:])},
                "ffv_eval_version": __version__,
            }, force=True)
            bar.update(1)
        seconds = time.perf_counter() - t
        progress(f"[ffv] basis {start + len(group)}/{len(missing)} trained ({seconds / len(group):.1f}s per relation); "
                 f"training-pair accuracy {sum(before) / len(group):.2f} -> {sum(after) / len(group):.2f}")
    bar.close()
    return load_basis(directory, [r.name for r in relations], fingerprint)


def _training_fit(patcher, tokenizer, pair_lists, layer, vectors) -> tuple[list[float], list[float]]:
    accuracy, logprob = [], []
    for pairs, vector in zip(pair_lists, vectors):
        a, lp = first_token_scores(patcher, tokenizer, pairs, layer, vector[None])
        accuracy.append(float(a[0]))
        logprob.append(float(lp[0]))
    return accuracy, logprob


def _check_cached(stored, relation: BasisRelation, fingerprint: str, layer: int) -> None:
    meta = stored.metadata
    if meta["layer"] != layer:
        raise BasisError(f"{stored.path}: basis vector added after block {meta['layer']}, this basis is at block {layer}; "
                         f"rebuild with --force, or build into another --out")
    if meta["model_fingerprint"] != fingerprint:
        raise BasisError(f"{stored.path}: basis vector made for model fingerprint {meta['model_fingerprint']} "
                         f"({meta.get('model', 'unknown')}), the loaded model is {fingerprint}; rebuild with --force")
    if meta.get("data", {}).get("pairs_sha256") != pairs_sha256(relation.pairs):
        raise BasisError(f"{stored.path}: basis vector was trained on other pairs than {relation.origin} now gives; rebuild with --force")


def load_basis(directory: Path, names: Sequence[str] | None = None, fingerprint: str | None = None) -> Basis:
    """The basis vectors in `directory` (all, or `names` in that order). Errors: an empty or
    missing basis, a vector for another model, vectors at different layers."""
    directory = Path(directory)
    if names is None:
        paths = sorted(directory.rglob("*.safetensors"))
        names = [str(p.relative_to(directory).with_suffix("")) for p in paths]
    else:
        paths = [basis_vector_file(directory, n) for n in names]
    if not paths:
        raise BasisError(f"empty basis: no basis vectors under {directory}; run: ffv basis build")
    stored = []
    for path in paths:
        try:
            vector = load_vector(path)
        except VectorFileError as err:
            raise BasisError(f"basis {directory}: {err}") from err
        if vector.metadata["kind"] != BASIS_KIND:
            raise BasisError(f"{path}: kind is {vector.metadata['kind']!r}, not a basis vector")
        if fingerprint is not None and vector.metadata["model_fingerprint"] != fingerprint:
            raise BasisError(f"{path}: basis built for model fingerprint {vector.metadata['model_fingerprint']} "
                             f"({vector.metadata.get('model', 'unknown')}), the loaded model is {fingerprint}")
        stored.append(vector)
    layers = {v.metadata["layer"] for v in stored}
    if len(layers) != 1:
        raise BasisError(f"basis {directory}: vectors at different layers {sorted(layers)}")
    return Basis(list(names), torch.stack([v.vector for v in stored]), layers.pop(), stored[0].metadata["model_fingerprint"], directory)
