"""What a continuation fix is: the releases whose transformers needs it, a check, and a per-instance installer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
