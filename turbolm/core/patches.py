"""In-place patches of a loaded model that undo exactly what they did, and refuse to stack badly.

turbolm changes a loaded Hugging Face model without forking its modeling code: token skipping
(:class:`turbolm.pruning.skipping.TokenPruner`) and layer dropping
(:class:`turbolm.pruning.baselines.LayerDropper`) replace ``forward`` on module instances, and
the fast CPU kernels (:func:`turbolm.core.kernels.optimize_for_small_batches`) swap the class
of every ``nn.Linear``. Each is a :class:`ModelPatch`:

- Every change goes through :meth:`ModelPatch.replace`, which records what was there before:
  the very object in the instance's ``__dict__`` (e.g. the ``forward`` that accelerate's
  ``add_hook_to_module`` installs), or nothing, in which case detaching deletes ours and the
  class attribute shows again. ``__class__`` is recorded the same way. Forward hooks go
  through :meth:`ModelPatch.add_forward_hook` and are removed on detach.
- :meth:`ModelPatch.detach` undoes the changes in reverse order, after checking that every
  attribute still holds what this patch put there. If another patch (or any other code)
  replaced one of them since, it raises :class:`~.errors.ModelError` and changes nothing:
  undoing would silently throw the other change away.
- The attached patches of a model are listed in one attribute of the model,
  ``model.turbolm_patches`` (absent when none is attached; :func:`active`, :func:`find`).
  Each patch class declares in ``patches`` which parts of a model it changes; a patch that
  shares one of them with an attached patch is refused with a message naming both. Token
  skipping and layer dropping both rewrite the decoder layers' forwards and exclude each
  other; the linear class swap combines with either.

``attach()`` on an attached patch and ``detach()`` on a detached one do nothing; ``with patch:``
attaches it for the block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import ModelError

REGISTRY = "turbolm_patches"


class _Absent:
    """Stands for "no instance attribute of that name" in a record (the class attribute shows)."""

    def __repr__(self):
        return "<absent>"

    def __reduce__(self):
        # Deep copies (truncated_draft copies a patched model) and pickles must keep the
        # singleton, or a copy's detach would set the marker instead of deleting.
        return "ABSENT"


ABSENT = _Absent()


def _current(obj, name: str):
    if name == "__class__":
        return type(obj)
    return vars(obj).get(name, ABSENT)


def _put(obj, name: str, value) -> None:
    # object's own set/del, not nn.Module's: a patch lives in the instance __dict__ and must not
    # be registered as a submodule when the value happens to be an nn.Module.
    if value is ABSENT:
        object.__delattr__(obj, name)
    else:
        object.__setattr__(obj, name, value)


@dataclass
class _Change:
    obj: object
    name: str
    before: object  # what was there when this patch first replaced it (ABSENT: nothing)
    after: object  # what this patch put there last


def active(model) -> list[ModelPatch]:
    """The patches attached to ``model``, in the order they were attached."""
    return list(vars(model).get(REGISTRY, ()))


def find(model, kind: type) -> ModelPatch | None:
    """The attached patch of class ``kind`` (or a subclass) on ``model``, or None."""
    return next((p for p in active(model) if isinstance(p, kind)), None)


class ModelPatch:
    """Something that changes ``model`` in place while attached; subclasses implement :meth:`_patch`.

    ``patches``: the parts of a model this patch changes (e.g. ``{"decoder_layers"}``); two
    patches that share one are never attached to the same model together.
    """

    patches: frozenset[str] = frozenset()

    def __init__(self, model):
        self.model = model
        self._undo: list = []  # _Change records and hook handles, in the order they were made
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    def _patch(self) -> None:
        """Make the changes, through :meth:`replace` and :meth:`add_forward_hook` only."""
        raise NotImplementedError

    # -- what subclasses call from _patch() --------------------------------------------------
    def replace(self, obj, name: str, value) -> None:
        """Set ``obj.<name> = value`` as an instance attribute (or ``obj``'s class, for
        ``"__class__"``), remembering what was there for :meth:`detach`."""
        if isinstance(obj, nn.Module) and any(name in d for d in (obj._parameters, obj._buffers, obj._modules)):
            raise ValueError(f"{name} is a parameter, buffer or submodule of {type(obj).__name__}; "
                             "a patch replaces plain attributes only")
        # Replacing again (e.g. a new fast_max_rows) keeps the first record: detach restores what
        # was there before this patch, not this patch's own earlier value.
        change = next((c for c in reversed(self._undo)
                       if isinstance(c, _Change) and c.obj is obj and c.name == name), None)
        if change is None:
            change = _Change(obj, name, _current(obj, name), value)
            self._undo.append(change)
        _put(obj, name, value)
        change.after = value

    def add_forward_hook(self, module: nn.Module, hook, **kwargs) -> None:
        """``module.register_forward_hook(hook, **kwargs)``, removed again on :meth:`detach`."""
        self._undo.append(module.register_forward_hook(hook, **kwargs))

    # -- attaching ---------------------------------------------------------------------------
    def attach(self):
        if self._attached:
            return self
        for other in active(self.model):
            shared = self.patches & other.patches
            if shared:
                first = f"another {type(other).__name__}" if type(other) is type(self) else type(other).__name__
                raise ModelError(f"cannot attach {type(self).__name__}: {first} is already attached to this model and "
                                 f"both patch {', '.join(sorted(shared))}; detach the {type(other).__name__} first")
        try:
            self._patch()
        except BaseException:
            self._revert()  # a half-made patch would leave the model in neither state
            raise
        registry = vars(self.model).setdefault(REGISTRY, [])
        registry.append(self)
        self._attached = True
        return self

    def detach(self) -> None:
        if not self._attached:
            return
        for change in self._undo:
            if isinstance(change, _Change) and _current(change.obj, change.name) is not change.after:
                raise ModelError(self._replaced_since(change))
        self._revert()
        registry = vars(self.model)[REGISTRY]
        registry.remove(self)
        if not registry:
            object.__delattr__(self.model, REGISTRY)
        self._attached = False

    def _revert(self) -> None:
        for entry in reversed(self._undo):
            if isinstance(entry, _Change):
                _put(entry.obj, entry.name, entry.before)
            else:
                entry.remove()
        self._undo.clear()

    def _replaced_since(self, change: _Change) -> str:
        where = self._describe(change.obj, change.name)
        mine = type(self).__name__
        patches = active(self.model)
        later = [p for p in patches[patches.index(self) + 1:]
                 if any(isinstance(c, _Change) and c.obj is change.obj and c.name == change.name for c in p._undo)]
        if later:
            other = type(later[-1]).__name__
            return f"cannot detach {mine}: {other} replaced {where} after it; detach the {other} first"
        return (f"cannot detach {mine}: {where} was replaced after {mine} patched it, by code outside turbolm's "
                "patches (e.g. an accelerate hook added later); remove that first")

    def _describe(self, obj, name: str) -> str:
        """``model.model.layers.0.forward``-style name of an attribute, for error messages."""
        if isinstance(self.model, nn.Module):
            for path, module in self.model.named_modules():
                if module is obj:
                    return ".".join(["model"] + ([path] if path else []) + [name])
        return f"{type(obj).__name__}.{name}"

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()
