"""Interventions (ffv_eval.models.patching) on tiny random Llama and Gemma 3 models, against plain
torch-hook references."""

import pytest
import torch

from ffv_eval.models.patching import Patcher
from ffv_eval.models.tiny import FAMILY_NAMES, build_tiny_model


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


def test_block_output_is_the_residual_stream_after_the_block_at_each_rows_position(tiny_model):
    patcher = Patcher(tiny_model)
    ids = torch.randint(1, 120, (3, 7))
    positions = torch.tensor([2, 6, 0])
    captured = []
    handle = tiny_model.model.layers[1].register_forward_hook(lambda m, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        tiny_model.model(ids)
    handle.remove()
    got = patcher.block_output(ids, positions, 1)
    assert got.dtype == torch.float32 and got.shape == (3, patcher.adapter.hidden_size)
    assert torch.allclose(got, captured[0][torch.arange(3), positions].float(), atol=1e-6)
    assert not torch.allclose(got, patcher.block_output(ids, positions, 0), atol=1e-3)  # another block, another stream


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


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_blocks_before_the_vector_run_once_per_row_and_give_the_repeated_rows_result(family):
    """final_hidden_per_vector (blocks 0..layer once per row, the rest once per vector) equals
    final_hidden on the rows and their cache repeated once per vector, in every family; the
    shared blocks run on B rows only, and every block's own forward is given back."""
    model = build_tiny_model(family, vocab_size=120)
    patcher = Patcher(model)
    blocks = patcher.adapter.decoder_layers()
    layer, n, g = 1, 3, torch.Generator().manual_seed(2)
    prefix, tail = torch.randint(1, 120, (2, 5), generator=g), torch.randint(1, 120, (2, 3), generator=g)
    vectors = torch.randn(2 * n, patcher.adapter.hidden_size, generator=g) * 3
    positions = torch.zeros(2, dtype=torch.long)
    base = patcher.adapter.base_model()
    own = [b.__dict__.get("forward") for b in blocks]
    with torch.no_grad():
        cache = base(input_ids=prefix, use_cache=True).past_key_values
        cache.batch_repeat_interleave(n)
        expected = patcher.final_hidden(tail.repeat_interleave(n, 0), None, layer=layer, vector=vectors,
                                        positions=positions.repeat_interleave(n), past_key_values=cache, use_cache=True)
        cache = base(input_ids=prefix, use_cache=True).past_key_values
        rows = {0: [], layer + 1: []}  # rows each block's attention output projection saw: the block really ran
        hooks = [patcher.adapter.o_proj(i).register_forward_hook(lambda m, a, o, i=i: rows[i].append(a[0].shape[0])) for i in rows]
        got = patcher.final_hidden_per_vector(tail, cache, layer=layer, vectors=vectors, positions=positions)
        for hook in hooks:
            hook.remove()
    assert got.shape == expected.shape == (2 * n, 3, patcher.adapter.hidden_size)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert rows == {0: [2], layer + 1: [2 * n]}  # block 0 once per row, the block after the vector once per vector
    assert [b.__dict__.get("forward") for b in blocks] == own
