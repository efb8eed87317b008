"""Interventions and causal mediation on tiny random Llama and Gemma 3 models, against plain
torch-hook references."""

import random

import torch

from ffv_eval.vectors import function_vectors as fv

from ffv_eval.models import tokens
from ffv_eval.models.architectures import GemmaAdapter, UnsupportedArchitecture, adapter_for
from ffv_eval.models.patching import Patcher
from ffv_eval.data.relations import WordPair


def test_vector_is_added_only_at_each_rows_position(tiny_model):
    patcher = Patcher(tiny_model)
    ids = torch.randint(1, 120, (3, 7))
    positions = torch.tensor([2, 4, 6])
    vector = torch.randn(3, patcher.adapter.hidden_size) * 5

    def hook(module, inputs, output):
        output = output.clone()
        output[torch.arange(3), positions] += vector
        return output

    with torch.no_grad():
        patched = patcher.final_hidden(ids, layer=1, vector=vector, positions=positions)
        handle = tiny_model.model.layers[1].register_forward_hook(hook)
        expected = tiny_model.model(ids).last_hidden_state
        handle.remove()
        plain = tiny_model.model(ids).last_hidden_state
    assert torch.allclose(patched, expected, atol=1e-6)
    changed = (patched - plain).abs().amax(-1) > 1e-6
    for row, pos in enumerate(positions.tolist()):  # causal: nothing before the patch moves
        assert not changed[row, :pos].any() and changed[row, pos]


def test_head_outputs_and_head_patches_match_hooks(tiny_model):
    patcher = Patcher(tiny_model)
    a = patcher.adapter
    ids = torch.randint(1, 120, (2, 6))
    positions = torch.tensor([3, 5])
    captured = []
    hooks = [a.o_proj(l).register_forward_pre_hook(lambda m, args: captured.append(args[0][torch.arange(2), positions]))
             for l in range(a.n_layers)]
    with torch.no_grad():
        tiny_model.model(ids)
    for h in hooks:
        h.remove()
    heads = patcher.head_outputs(ids, positions)
    assert heads.shape == (2, a.n_layers, a.n_heads, a.head_dim)
    assert torch.allclose(heads, torch.stack(captured, 1).view_as(heads), atol=1e-6)

    values = torch.randn(2, a.head_dim)
    with torch.no_grad():
        logits = patcher.last_logits_with_head_patches(ids, [1, -1], [2, 0], values)
        plain = tiny_model(ids).logits[:, -1]
    assert not torch.allclose(logits[0], plain[0], atol=1e-4)  # row 0 patched
    assert torch.allclose(logits[1], plain[1], atol=1e-5)  # row 1 left alone


def test_cached_batched_indirect_effects_equal_the_straightforward_loop(tiny_model):
    patcher = Patcher(tiny_model)
    prompts = tokens.PromptSet(input_ids=[random.Random(i).sample(range(1, 120), 9) for i in range(3)], answer_ids=[5, 17, 33])
    mean_heads = torch.randn(patcher.adapter.n_layers, patcher.adapter.n_heads, patcher.adapter.head_dim)
    fast = fv.indirect_effects(patcher, prompts, mean_heads, head_batch=5)  # several batches
    slow = fv.indirect_effects_reference(patcher, prompts, mean_heads)
    plain = fv.indirect_effects_reference(patcher, prompts, mean_heads, full_model=True)
    assert slow.abs().max() > 1e-4
    assert (fast - slow).abs().max() < 1e-5 and (plain - slow).abs().max() < 1e-5


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


def test_shuffled_labels_break_the_relation():
    demos = [WordPair(f"w{i}", f"o{i}") for i in range(10)]
    from ffv_eval.data.prompts import shuffled_label_demos

    shuffled = shuffled_label_demos(demos, random.Random(0))
    assert [p.input for p in shuffled] == [p.input for p in demos]
    assert sorted(p.output for p in shuffled) == sorted(p.output for p in demos)
    assert any(a.output != b.output for a, b in zip(shuffled, demos))
