"""ModelPatch: exact restore (accelerate hooks included), refusing conflicting patches, stacking the
fast linear swap with the token pruner, and the base's own bookkeeping on plain objects."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from torch import nn

from conftest import random_ids
from turbolm import load_target
from turbolm.core import kernels
from turbolm.core.errors import ModelError
from turbolm.core.kernels import FastLinear, is_optimized, optimize_for_small_batches, restore
from turbolm.core.patches import ModelPatch, active, find
from turbolm.pruning import StaticRouter, TokenPruner
from turbolm.pruning.baselines import LayerDropper


@pytest.fixture()
def model(tiny_dir):
    """A fresh tiny Llama (2 layers) per test: these tests patch it and must not leak."""
    return load_target(tiny_dir)[0]


def _pruner(model):
    return TokenPruner(model, StaticRouter(), [0.5] * model.config.num_hidden_layers)


def _dropper(model):
    return LayerDropper(model, drop_layers=[1], drop_attention=[0])


PATCHES = {"pruner": _pruner, "dropper": _dropper}


def _logits(model, ids=None):
    with torch.no_grad():
        return model(random_ids(T=16, B=2) if ids is None else ids, use_cache=False).logits


def _instance_forwards(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in vars(m)]


def _forward_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class CountingHook(ModelHook):
    def __init__(self):
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


# -- exact restore on a real model ---------------------------------------------------------------
@pytest.mark.parametrize("kind", PATCHES)
def test_accelerate_hook_survives_attach_and_detach(model, kind):
    layers = model.model.layers
    hooks = [CountingHook() for _ in layers]
    for layer, hook in zip(layers, hooks):
        add_hook_to_module(layer, hook)
    hooked = [vars(layer)["forward"] for layer in layers]
    dense = _logits(model)
    assert all(h.calls == 1 for h in hooks)
    with PATCHES[kind](model):
        assert any(vars(layer)["forward"] is not f for layer, f in zip(layers, hooked))
        _logits(model)
    for layer, f in zip(layers, hooked):
        assert layer.forward is f  # the very object accelerate installed, not the class forward
    calls = [h.calls for h in hooks]
    assert torch.equal(_logits(model), dense)
    assert [h.calls for h in hooks] == [c + 1 for c in calls]  # and it still runs


@pytest.mark.parametrize("kind", PATCHES)
def test_exact_restore_without_instance_forward(model, kind):
    dense = _logits(model)
    hooks = _forward_hooks(model)
    patch = PATCHES[kind](model).attach()
    assert _instance_forwards(model) and active(model) == [patch] and find(model, type(patch)) is patch
    assert not torch.equal(_logits(model), dense)
    patch.detach()
    assert _instance_forwards(model) == []
    assert _forward_hooks(model) == hooks
    assert not {"turbolm_patches", "turbolm_pruner", "turbolm_dropper"} & set(vars(model))
    assert active(model) == [] and find(model, type(patch)) is None
    assert torch.equal(_logits(model), dense)


def test_hook_added_after_attach_blocks_detach(model):
    """Something that wrapped our forward since: detaching would throw it away, so it raises."""
    layer = model.model.layers[0]
    pruner = _pruner(model).attach()
    ours = vars(layer)["forward"]
    add_hook_to_module(layer, CountingHook())
    with pytest.raises(ModelError, match=r"cannot detach TokenPruner: model\.model\.layers\.0\.forward .*outside"):
        pruner.detach()
    assert pruner.attached and vars(layer)["forward"] is not ours  # nothing was undone
    remove_hook_from_module(layer)  # puts our forward back
    pruner.detach()
    assert _instance_forwards(model) == [] and active(model) == []


# -- conflicts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("first, second", [("pruner", "dropper"), ("dropper", "pruner"), ("pruner", "pruner")])
def test_pruner_and_dropper_refuse_each_other(model, first, second):
    dense = _logits(model)
    a = PATCHES[first](model).attach()
    forwards = {name: vars(m)["forward"] for name, m in model.named_modules() if "forward" in vars(m)}
    b = PATCHES[second](model)
    names = {"pruner": "TokenPruner", "dropper": "LayerDropper"}
    other = ("another " if first == second else "") + names[first]
    with pytest.raises(ModelError, match=rf"cannot attach {names[second]}: {other} is already attached .*"
                                         rf"decoder_layers; detach the {names[first]} first"):
        b.attach()
    assert not b.attached and active(model) == [a]
    assert {name: vars(m)["forward"] for name, m in model.named_modules() if "forward" in vars(m)} == forwards
    a.detach()
    with b:  # once the first is gone, the second attaches
        assert active(model) == [b]
    assert _instance_forwards(model) == [] and torch.equal(_logits(model), dense)


def test_attach_twice_and_detach_twice_are_harmless(model):
    dense = _logits(model)
    pruner = _pruner(model)
    pruner.detach()  # never attached
    assert pruner.attach() is pruner
    forward = vars(model.model.layers[0])["forward"]
    hooks = _forward_hooks(model)
    assert pruner.attach() is pruner
    assert vars(model.model.layers[0])["forward"] is forward and _forward_hooks(model) == hooks
    assert active(model) == [pruner]
    with pruner as p:  # entering an attached patch changes nothing either
        assert p is pruner
    assert not pruner.attached
    pruner.detach()
    assert _instance_forwards(model) == [] and torch.equal(_logits(model), dense)


# -- the fast linear swap stacks with the token pruner -----------------------------------------
def _close(a, b):
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not kernels.available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("fast_first", [True, False])
@pytest.mark.parametrize("detach_fast_first", [True, False])
def test_fast_linear_stacks_with_pruner(model, fast_first, detach_fast_first):
    dense = _logits(model)
    pruner = _pruner(model)
    with pruner:
        pruned = _logits(model)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    if fast_first:
        optimize_for_small_batches(model, force=True)
    pruner.attach()
    if not fast_first:
        optimize_for_small_batches(model, force=True)
    assert sum(type(m) is FastLinear for m in model.modules()) == n_linear
    assert [type(p).__name__ for p in active(model)] == (["FastLinearPatch", "TokenPruner"] if fast_first
                                                          else ["TokenPruner", "FastLinearPatch"])
    assert _close(_logits(model), pruned)
    if detach_fast_first:
        restore(model)
        assert not is_optimized(model) and pruner.attached
        assert torch.equal(_logits(model), pruned)
        pruner.detach()
    else:
        pruner.detach()
        assert is_optimized(model) and _instance_forwards(model) == []
        assert _close(_logits(model), dense)
        restore(model)
    assert sum(type(m) is nn.Linear for m in model.modules()) == n_linear
    assert not any("fast_plan" in vars(m) for m in model.modules())
    assert _instance_forwards(model) == [] and "turbolm_patches" not in vars(model)
    assert torch.equal(_logits(model), dense)


@pytest.mark.skipif(not kernels.available(), reason="this PyTorch build has no oneDNN")
def test_deep_copy_of_a_patched_model_restores_on_its_own(model):
    """truncated_draft deep-copies a fast target: the copy carries its own patch and undoes it."""
    optimize_for_small_batches(model, max_rows=8, force=True)
    twin = copy.deepcopy(model)
    assert is_optimized(twin) and find(twin, kernels.FastLinearPatch) is not find(model, kernels.FastLinearPatch)
    restore(twin)
    assert not is_optimized(twin) and not any("fast_plan" in vars(m) for m in twin.modules())
    assert is_optimized(model) and "turbolm_patches" not in vars(twin)
    restore(model)
    assert not is_optimized(model)


# -- the base on plain objects -------------------------------------------------------------------
class Box:
    def forward(self):
        return "class"


class Boxed(Box):
    pass


def _patch_class(declared, attr="forward", value=None):
    class Patch(ModelPatch):
        patches = frozenset(declared)

        def _patch(self):
            self.replace(self.model, attr, value if value is not None else (lambda: type(self).__name__))

    return Patch


First = type("First", (_patch_class({"a"}),), {})
Second = type("Second", (_patch_class({"b"}),), {})


def test_shared_attribute_detaches_only_in_reverse_order():
    box = Box()
    first, second = First(box).attach(), Second(box).attach()  # declared compatible, same attribute
    assert box.forward() == "Second"
    with pytest.raises(ModelError, match="cannot detach First: Second replaced Box.forward after it; "
                                         "detach the Second first"):
        first.detach()
    assert first.attached and box.forward() == "Second" and active(box) == [first, second]
    second.detach()
    assert box.forward() == "First"
    first.detach()
    assert "forward" not in vars(box) and box.forward() == "class" and vars(box) == {}


def test_shared_attribute_restores_a_previous_instance_attribute():
    box = Box()
    mine = box.forward = lambda: "mine"
    with First(box), Second(box):
        assert box.forward() == "Second"
    assert vars(box) == {"forward": mine}


def test_replacing_again_keeps_what_was_there_first():
    """A patch that updates its own value (like a second optimize_for_small_batches) still
    detaches back to what was there before it, not to its own earlier value."""
    box = Box()
    first = First(box).attach()
    first.replace(box, "forward", lambda: "updated")
    assert box.forward() == "updated"
    first.detach()
    assert vars(box) == {}


def test_declared_conflict_names_both():
    box = Box()
    first = First(box).attach()
    clash = type("Clash", (_patch_class({"a", "c"}, attr="other"),), {})(box)
    with pytest.raises(ModelError, match="cannot attach Clash: First is already attached to this model and both "
                                         "patch a; detach the First first"):
        clash.attach()
    assert "other" not in vars(box)
    first.detach()
    clash.attach().detach()
    assert vars(box) == {}


def test_class_swap_and_failed_attach_roll_back():
    box = Box()

    class Swap(ModelPatch):
        def _patch(self):
            self.replace(self.model, "__class__", Boxed)
            self.replace(self.model, "forward", lambda: "swapped")
            raise RuntimeError("half-way")

    with pytest.raises(RuntimeError):
        Swap(box).attach()
    assert type(box) is Box and vars(box) == {}  # nothing half-made is left

    class Swap2(Swap):
        def _patch(self):
            self.replace(self.model, "__class__", Boxed)

    with Swap2(box):
        assert type(box) is Boxed
    assert type(box) is Box


def test_refuses_parameters_and_submodules():
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="plain attributes only"):
        _patch_class({"w"}, attr="weight", value=nn.Parameter(torch.zeros(2, 2)))(lin).attach()
    assert type(lin.weight) is nn.Parameter and "weight" not in vars(lin) and active(lin) == []
