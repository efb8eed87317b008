"""Interventions (ffv_eval.models.patching) on tiny random Llama and Gemma 3 models, against plain
torch-hook references."""

import torch

from ffv_eval.models.patching import Patcher


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
    hooks = [a.o_proj(layer).register_forward_pre_hook(lambda m, args: captured.append(args[0][torch.arange(2), positions]))
             for layer in range(a.n_layers)]
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
