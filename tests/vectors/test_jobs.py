"""The vector jobs (ffv_eval.vectors.jobs, what `ffv extract`, `ffv train` and `ffv decode` run):
what an extraction stores, a Llama-type model's vectors, the shipped vectors decoded side by side,
and the jobs in bfloat16."""

import struct

import pytest
import torch

from ffv_eval import VECTORS_DIR
from ffv_eval.data.relations import load_relation
from ffv_eval.models.loading import Placement, model_fingerprint
from ffv_eval.vectors import function_vectors as fv
from ffv_eval.vectors.fine_tuning import TrainingSettings
from ffv_eval.vectors.jobs import extract_and_save
from ffv_eval.vectors.store import VectorFileError, VectorNameError, load_vector
from tests.conftest import tiny_checkpoint

SMALL = fv.ExtractionSettings(n_mean_prompts=8, n_effect_prompts=3, layer=6, top_k_choices=(1, 3), scale_choices=(1.0, 2.0))


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_extract_saves_vector_metadata_and_heatmap(tmp_path, gemma):
    out = tmp_path / "antonym.safetensors"
    extract_and_save("gemma-3-270m", "antonym", out=str(out), settings=SMALL)
    stored = load_vector(out)
    meta = stored.metadata
    model, _ = gemma
    assert meta["model_fingerprint"] == model_fingerprint(model) and meta["hidden_size"] == 640
    assert meta["layer"] == 6 and meta["seed"] == 0 and meta["kind"] == "fv"
    assert meta["data"]["sha256"] == load_relation("antonym").sha256
    effects = [h["indirect_effect"] for h in meta["heads"]]
    assert effects == sorted(effects, reverse=True) and effects[0] > 0.01  # a head that carries the task
    metrics = meta["metrics"]
    assert metrics["validation_first_token_accuracy"] >= metrics["validation_zero_shot_first_token_accuracy"]
    width, height = _png_size(out.with_suffix(".png"))
    assert width > 200 and height > 200
    with pytest.raises(VectorFileError, match="exists; pass --force"):
        extract_and_save("gemma-3-270m", "antonym", out=str(out), settings=SMALL)


@pytest.mark.slow
def test_llama_type_model_extracts_and_refuses_gemma_vectors(tmp_path):
    from ffv_eval.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m")
    out = tmp_path / "smol.safetensors"
    extract_and_save("smollm2-135m", "antonym", out=str(out), settings=fv.ExtractionSettings(
        n_mean_prompts=4, n_effect_prompts=2, layer=8, top_k_choices=(3,), scale_choices=(1.0,)))
    meta = load_vector(out).metadata
    assert meta["hidden_size"] == 576 and meta["model_type"] == "llama" and meta["model_fingerprint"] == model_fingerprint(model)
    assert meta["heads"][0]["indirect_effect"] > 0
    from ffv_eval import VECTORS_DIR

    gemma_vector = load_vector(VECTORS_DIR / "gemma-3-270m" / "fv" / "antonym.safetensors")
    from ffv_eval.vectors.store import check_compatible

    with pytest.raises(VectorFileError, match="hidden size 640, the model has 576"):
        check_compatible(gemma_vector, 576, 30, model_fingerprint(model), None)


@pytest.mark.slow
def test_decode_shows_the_shipped_vectors_of_a_relation_side_by_side():
    from ffv_eval.vectors.jobs import decode_and_print

    printed = []
    decodings = decode_and_print(["antonym"], "gemma-3-270m", k=20, print_=printed.append)
    assert list(decodings) == ["fv:antonym", "ffv:antonym", "ffv-random:antonym"]
    assert all(len(d.tokens) == 20 and d.n_hits == sum(d.hits) for d in decodings.values())
    assert "answer tokens" in printed[0] and "ffv:antonym" in printed[0]
    with pytest.raises(VectorNameError, match="no shipped vector 'no-such'"):
        decode_and_print(["no-such"], "gemma-3-270m")


# -- bfloat16 ---------------------------------------------------------------------------------------
def test_jobs_run_in_bfloat16_and_store_float32_vectors(tmp_path):
    """extract, train, decode and the quality measurement on a tiny bfloat16 checkpoint."""
    from ffv_eval.evaluation.quality_gate import measure_quality
    from ffv_eval.vectors.jobs import decode_and_print, extract_and_save, train_and_save
    from ffv_eval.vectors.store import load_vector

    saved, path = tiny_checkpoint(tmp_path)
    bf16, quiet = Placement("cpu", "bfloat16"), (lambda message: None)
    fv_path = extract_and_save(path, "antonym", out=str(tmp_path / "fv.safetensors"), placement=bf16, progress=quiet,
                               settings=fv.ExtractionSettings(n_mean_prompts=4, n_effect_prompts=2, top_k_choices=(2,)))
    ffv_path = train_and_save(path, "antonym", out=str(tmp_path / "ffv.safetensors"), start_from=str(fv_path), placement=bf16,
                              progress=quiet, settings=TrainingSettings(steps=3))
    for stored in (load_vector(fv_path), load_vector(ffv_path)):
        assert stored.vector.dtype == torch.float32 and stored.metadata["model_fingerprint"] == model_fingerprint(saved)
    assert not torch.equal(load_vector(fv_path).vector, load_vector(ffv_path).vector)
    decodings = decode_and_print([str(ffv_path)], path, k=20, placement=bf16, print_=quiet)
    assert len(decodings["ffv:antonym"].tokens) == 20
    figures = measure_quality(path, [ffv_path], placement=bf16)["vectors"]["ffv/antonym"]
    assert figures["decoding_hits"] == decodings["ffv:antonym"].n_hits


@pytest.mark.slow
def test_gemma_trains_in_bfloat16_from_the_float32_fv(tmp_path):
    from ffv_eval.vectors.jobs import train_and_save
    from ffv_eval.vectors.store import load_vector

    # the FV was made in float32; the bfloat16 model has the same fingerprint, so training starts from it
    out = train_and_save("gemma-3-270m", "antonym", out=str(tmp_path / "ffv.safetensors"), placement=Placement("cpu", "bfloat16"),
                         progress=lambda message: None, settings=TrainingSettings(steps=4))
    trained = load_vector(out)
    shipped = load_vector(VECTORS_DIR / "gemma-3-270m" / "fv" / "antonym.safetensors")
    assert trained.vector.dtype == torch.float32 and trained.metadata["model_fingerprint"] == shipped.metadata["model_fingerprint"]
    metrics = trained.metadata["metrics"]
    assert metrics["last_loss"] < metrics["first_loss"]
    assert metrics["validation_first_token_accuracy"] > metrics["validation_first_token_accuracy_at_init"]


@pytest.mark.parametrize("bad, message", [({"scale": 0.0}, "--scale must be a positive number"),
                                          ({"loss": "whole"}, "--loss must be one of"),
                                          ({"init": "zeros"}, "--init must be one of fv, random, icl-diff")])
def test_training_settings_are_refused_before_any_model_work(tmp_path, bad, message):
    from ffv_eval.errors import SettingError
    from ffv_eval.vectors.jobs import train_and_save

    said = []
    with pytest.raises(SettingError, match=message):
        train_and_save("gemma-3-270m", "antonym", out=str(tmp_path / "ffv.safetensors"), settings=TrainingSettings(**bad),
                       progress=said.append)
    assert said == [] and list(tmp_path.iterdir()) == []
