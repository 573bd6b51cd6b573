"""What a continuation fix is: the releases whose transformers needs it, a check, and a per-instance installer."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

from ..conventions import release


@dataclass(frozen=True)
class Fix:
    """One correction of transformers' continuation from a populated cache.

    ``broken_in`` is the set of transformers releases whose unfixed model continues wrongly (checked per release by
    ``tests/test_conformance.py``, which runs the unfixed model on the installed release); the fix is installed on
    those releases only, since a fix that applies twice is as wrong as a missing one. ``check`` raises
    ``UnsupportedModelError`` when the installed transformers is not built the way the fix expects. ``install``
    patches the modules of one model instance that need it, skipping those it patched before (so installing twice
    changes nothing), and returns how many modules the fix targets: 0 means the model is not built as expected.
    """

    name: str
    broken_in: SpecifierSet
    check: Callable[[nn.Module], None]
    install: Callable[[nn.Module], int]
    why: str

    def needed(self, installed: Version) -> bool:
        return release(installed) in self.broken_in


class InstanceForward:
    """A module's ``forward`` replaced on one instance by ``patch(module, forward, *args, **kwargs)``, where ``forward``
    is what the module's forward was before: an earlier instance-level forward (an accelerate hook, say), or its
    class's.

    Unlike a closure or a bound method in the module's ``__dict__``, this pickles (``torch.save(model)``) and
    deep-copies with the module: a copy patches the copied module, not the original. ``patch`` must be a
    module-level function.
    """

    def __init__(self, module: nn.Module, patch: Callable[..., Any], previous: Callable[..., Any] | None = None):
        self.module = module
        self.patch = patch
        self.previous = previous

    def _inner(self) -> Callable[..., Any]:
        return self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.patch(self.module, self._inner(), *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self._inner())

    def __reduce__(self) -> tuple[Any, ...]:
        return (InstanceForward, (self.module, self.patch, self.previous))


def patch_forward(module: nn.Module, patch: Callable[..., Any]) -> None:
    """Install ``patch`` as ``module``'s forward (this instance only), unless it is installed already."""
    current = module.__dict__.get("forward")
    if isinstance(current, InstanceForward) and current.patch is patch:
        return
    module.forward = InstanceForward(module, patch, current)
