"""What tracing a user's model changes on it, shared by its `ReplacementModel`s and undone exactly.

Wrapping a model for tracing changes it in place: its attention implementation and residual/final
norm forwards (tracer.model.freezing), eval mode and `requires_grad=False` on every parameter, and
NNSight's controller forward on every module of the decoder stack. A `Wrapping` makes those changes
once per model, counts the `ReplacementModel`s using it, and when the last one closes puts back
every instance attribute it changed on every module, the attention implementation and the
`requires_grad` flags. It also holds the model's lock: NNSight 0.8 cannot run two traces of the
same modules at once (its module controllers route every call to whichever trace is running,
across threads), so traced passes of one model take turns.
"""

from __future__ import annotations

import threading

import torch
from nnsight import NNsight

from tracer.model.families import Family, get_module
from tracer.model.freezing import Freezer

_ATTRIBUTE = "_tracer_wrapping"  # on the wrapped model, while wrapped


class _Missing:
    """Marks an instance attribute that did not exist before wrapping."""

    def __reduce__(self) -> str:  # copies and pickles of a wrapping keep the one marker
        return "_MISSING"


_MISSING = _Missing()


class Wrapping:
    """The changes tracing makes to one model; `acquire` per user, `release` undoes at the last."""

    def __init__(self, model: torch.nn.Module, family: Family) -> None:
        self.model, self.family = model, family
        self.freezer = Freezer.install(model, family)  # undone by its own uninstall
        before = {module: dict(vars(module)) for module in model.modules()}
        self.requires_grad = {p: p.requires_grad for p in model.parameters()}
        model.eval()
        model.requires_grad_(False)
        self._envoy: NNsight | None = NNsight(get_module(model, family.base))
        self.changes = _changed_attributes(before)  # eval's flags and NNSight's controllers
        self.lock = threading.RLock()
        self.users = 0

    @property
    def envoy(self) -> NNsight:
        """The NNSight envoy of the decoder stack."""
        if self._envoy is None:  # a copy's: NNSight's copied controllers route to no trace yet
            self._envoy = NNsight(get_module(self.model, self.family.base))
        return self._envoy

    def __getstate__(self) -> dict:
        # a deep copy of a wrapped model is wrapped alike, with its own lock and envoy and no
        # users yet: the next ReplacementModel of the copy takes it over, and its close()
        # restores the copy
        state = {k: v for k, v in vars(self).items() if k != "lock"}
        return state | {"users": 0, "_envoy": None}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state, lock=threading.RLock())

    @classmethod
    def acquire(cls, model: torch.nn.Module, family: Family) -> Wrapping:
        """The model's wrapping, made on first use; every call needs one `release`."""
        wrapping = vars(model).get(_ATTRIBUTE)
        if wrapping is None:
            wrapping = cls(model, family)
            vars(model)[_ATTRIBUTE] = wrapping
        wrapping.users += 1
        return wrapping

    def release(self) -> None:
        """One user less; the last one restores the model as it was before wrapping."""
        self.users -= 1
        if self.users > 0:
            return
        with self.lock:
            for module, key, previous in reversed(self.changes):
                if previous is _MISSING:
                    vars(module).pop(key, None)
                else:
                    vars(module)[key] = previous
            self.freezer.uninstall()
            for parameter, flag in self.requires_grad.items():
                parameter.requires_grad_(flag)
            vars(self.model).pop(_ATTRIBUTE, None)


def _changed_attributes(
    before: dict[torch.nn.Module, dict[str, object]],
) -> list[tuple[torch.nn.Module, str, object]]:
    """(module, attribute, value before) for every instance attribute added, replaced or removed
    since `before` was taken (values compared by identity)."""
    changes = []
    for module, old in before.items():
        new = vars(module)
        for key in new.keys() | old.keys():
            previous = old.get(key, _MISSING)
            if new.get(key, _MISSING) is not previous:
                changes.append((module, key, previous))
    return changes
