"""KV caches that append in place: same values as torch.cat, memory reused, every slicing path kept."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from conftest import make_config, make_model_dir, make_tokenizer, random_ids
from turbolm import load_target
from turbolm.core.generation import forward, new_cache
from turbolm.core.kvcache import GrowingLayer, append_in_place, growing_cache
from turbolm.speculative.cache import keep_only, new_tree_cache, truncate


def chunk(n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, 2, n, 4, generator=torch.Generator().manual_seed(seed))


def test_appends_equal_cat_and_reuse_the_buffer():
    view, buffer, reference = None, None, None
    pointers = set()
    for i, n in enumerate([5, 1, 1, 7, 1]):
        new = chunk(n, i)
        reference = new if reference is None else torch.cat([reference, new], 2)
        view, buffer = append_in_place(view, buffer, new)
        assert torch.equal(view, reference)
        pointers.add(buffer.data_ptr())
    assert len(pointers) == 1  # 15 positions fit the first buffer: never copied
    assert view.data_ptr() == buffer.data_ptr()


def test_a_full_buffer_doubles_and_keeps_its_content():
    view, buffer = append_in_place(None, None, chunk(3, 0))
    capacity = buffer.shape[2]
    first = buffer.data_ptr()
    reference = view.clone()
    new = chunk(capacity, 1)  # one more than fits
    view, buffer = append_in_place(view, buffer, new)
    assert buffer.data_ptr() != first and buffer.shape[2] >= capacity + 3
    assert torch.equal(view, torch.cat([reference, new], 2))


def test_truncation_stays_in_the_buffer_and_a_foreign_tensor_is_copied():
    view, buffer = append_in_place(None, None, chunk(10, 0))
    reference = view.clone()
    view, buffer2 = append_in_place(view[:, :, :4], buffer, chunk(2, 1))  # truncated, then appended
    assert buffer2.data_ptr() == buffer.data_ptr()
    assert torch.equal(view, torch.cat([reference[:, :, :4], chunk(2, 1)], 2))
    foreign = chunk(6, 2)  # e.g. a cache someone replaced with their own tensor
    view, buffer3 = append_in_place(foreign, buffer, chunk(1, 3))
    assert buffer3.data_ptr() not in (buffer.data_ptr(), foreign.data_ptr())
    assert torch.equal(view, torch.cat([foreign, chunk(1, 3)], 2))
    # a view that does not start at the buffer (positions dropped from the front) is not reused either
    view, buffer = append_in_place(None, None, chunk(10, 0))
    view, buffer4 = append_in_place(view[:, :, 2:], buffer, chunk(1, 4))
    assert buffer4.data_ptr() != buffer.data_ptr()
    assert torch.equal(view, torch.cat([chunk(10, 0)[:, :, 2:], chunk(1, 4)], 2))


def test_while_autograd_records_it_concatenates_and_backward_works():
    w = torch.ones(1, requires_grad=True)
    view, buffer = None, None
    total = 0
    for i in range(3):
        view, buffer = append_in_place(view, buffer, chunk(2, i) * w)
        total = total + view.sum()  # every step's view is used by the graph
    assert buffer is None
    total.backward()
    assert w.grad is not None


def test_cache_layouts():
    cache = growing_cache()
    assert cache.layer_class_to_replicate is GrowingLayer
    config = make_config("gemma2", make_tokenizer())
    layers = growing_cache(config).layers
    plain = DynamicCache(config=config).layers
    assert [type(a).__name__ for a in plain].count("DynamicLayer") == sum(isinstance(x, GrowingLayer) for x in layers)
    assert all(type(b) is type(a) for a, b in zip(layers, plain) if type(b) is not DynamicLayer)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_model_outputs_are_bit_identical_to_transformers_cache(arch, tmp_path):
    """Prompt, one-token steps, a multi-token block, truncation and tree surgery: the same logits."""
    model, _ = load_target(make_model_dir(tmp_path / arch, arch))
    ids = random_ids(40)
    plain, ours = DynamicCache(config=model.config), new_cache(model)
    assert any(isinstance(layer, GrowingLayer) for layer in ours.layers)

    def step(tokens):
        with torch.inference_mode():
            a = forward(model, tokens, plain).logits
            b = forward(model, tokens, ours).logits
        assert torch.equal(a, b)
        return a

    step(ids[:, :30])
    for t in range(30, 34):
        step(ids[:, t : t + 1])
    step(ids[:, 34:40])
    if arch == "llama":  # (transformers' sliding-window layers cannot crop once full)
        with torch.inference_mode():
            for cache in (plain, ours):
                cache.crop(-3)  # transformers' own crop on our layers
        step(ids[:, 5:8])
        # tree surgery (full-attention caches only, as the engine uses them)
        plain2, tree = DynamicCache(), new_tree_cache()
        with torch.inference_mode():
            forward(model, ids[:, :20], plain2), forward(model, ids[:, :20], tree)
            forward(model, ids[:, 20:30], plain2), forward(model, ids[:, 20:30], tree)
            for cache in (plain2, tree):
                keep_only(cache, 20, [0, 3, 4, 8])
                truncate(cache, 23)
        assert isinstance(tree.layers[0], GrowingLayer)
        with torch.inference_mode():
            a = forward(model, ids[:, 30:33], plain2).logits
            b = forward(model, ids[:, 30:33], tree).logits
        assert torch.equal(a, b)
