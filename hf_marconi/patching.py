"""Replacing one method of one object (a model, a module) without touching its class.

hf_marconi patches model instances in two places: the continuation fixes (a module's ``forward``) and what a
MarconiCache installs (``generate`` and two of transformers' generate hooks). Both use :class:`InstanceMethod`, an
instance attribute that calls ``patch(owner, replaced, *args, **kwargs)``, where ``replaced`` is what the attribute
replaced: an earlier instance attribute (another library's wrapper, an accelerate hook) or the class's method.

Unlike a closure or a bound method stored on the instance, it keeps the replaced method's signature and docstring
(transformers inspects some signatures) and pickles and deep-copies with its owner: a copy patches the copied object,
not the original. ``patch`` must be a module-level function.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable


class InstanceMethod:
    """``owner.<name>`` replaced by ``patch(owner, replaced, *args, **kwargs)``."""

    def __init__(self, owner: Any, name: str, patch: Callable[..., Any], previous: Callable[..., Any] | None = None):
        self.owner = owner
        self.name = name
        self.patch = patch
        self.previous = previous
        self.__doc__ = getattr(type(owner), name).__doc__  # what help(owner.<name>) shows

    def replaced(self) -> Callable[..., Any]:
        """What this attribute replaced, bound to the owner."""
        if self.previous is not None:
            return self.previous
        return getattr(type(self.owner), self.name).__get__(self.owner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.patch(self.owner, self.replaced(), *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.replaced())

    def __reduce__(self) -> tuple[Any, ...]:
        return (InstanceMethod, (self.owner, self.name, self.patch, self.previous))


def is_patched(owner: Any, name: str, patch: Callable[..., Any]) -> bool:
    """Whether ``owner.<name>`` is currently replaced by ``patch``."""
    current = vars(owner).get(name)
    return isinstance(current, InstanceMethod) and current.patch is patch


def patch_method(owner: Any, name: str, patch: Callable[..., Any]) -> None:
    """Replace ``owner.<name>`` (this object only) by ``patch``, wrapping what is there; nothing if already done."""
    if not is_patched(owner, name, patch):
        setattr(owner, name, InstanceMethod(owner, name, patch, vars(owner).get(name)))
