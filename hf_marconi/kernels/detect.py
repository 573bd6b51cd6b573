"""Which implementation each recurrent mixer of a model really calls: a CUDA kernel or transformers' torch fallback.

How transformers 5.x decides: the mixers of the Mamba / Mamba2 / hybrid families call module-level functions of
their modeling module (``mamba2_chunk_scan``, ``causal_conv1d_fn``, ``mamba_selective_scan`` ...) decorated with
``use_kernel_func_from_hub_with_fallback(name, package)``. When the modeling module is imported, that decorator
tries ``import mamba_ssm`` / ``import causal_conv1d`` and looks the kernel up (e.g.
``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``); if the import fails for any reason (package
missing, CUDA or ABI mismatch) the torch function is used, silently apart from a one-time log warning when it runs.
The choice is frozen in the decorated function's closure, which is what :func:`kernel_report` reads, so the report
says what *will* run, not what could. On top of that, a model loaded with ``use_kernels=True`` (the ``kernels``
package) may have functions replaced by Hub kernels; the report flags that.

Run ``python -m hf_marconi.kernels`` to print the report for the zoo's hybrid families.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

# Kernel packages transformers falls back from (import name -> pip distribution).
KERNEL_DISTRIBUTIONS: dict[str, str] = {
    "mamba_ssm": "mamba-ssm",
    "causal_conv1d": "causal-conv1d",
    "fla": "flash-linear-attention",
}
# Kernels that import fine but need a compiled extension only when called: mamba-ssm built from its main branch
# without MAMBA_KEEP_CUDA_BUILD=TRUE lacks `selective_scan_cuda` (Mamba1's scan), and calls raise then.
_NEEDS_EXTENSION: dict[tuple[str, str], str] = {
    ("mamba_ssm", "selective_scan_fn"): "selective_scan_cuda",
    ("mamba_ssm", "mamba_inner_fn"): "selective_scan_cuda",
}


@dataclass(frozen=True)
class PackageStatus:
    """Whether a kernel package imports here: its version, or the error that stops the import."""

    name: str
    version: str | None
    error: str | None

    @property
    def importable(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class KernelUse:
    """One kernel-or-fallback function a mixer class calls, and what it resolved to.

    ``function`` is the kernel's name (``mamba_chunk_scan_combined``), ``package`` the package it comes from,
    ``implementation`` the qualified name of the callable that runs (a ``mamba_ssm.*`` / ``causal_conv1d.*``
    function, or transformers' own torch function), ``layers`` the layer indices of the mixer instances.
    """

    mixer: str
    layers: tuple[int, ...]
    function: str
    package: str
    implementation: str

    @property
    def is_kernel(self) -> bool:
        return not self.implementation.startswith("transformers.")

    @property
    def missing_extension(self) -> str | None:
        """The compiled extension this kernel needs at call time and cannot import, if any."""
        extension = _NEEDS_EXTENSION.get((self.package, self.function))
        if not self.is_kernel or extension is None or importlib.util.find_spec(extension) is not None:
            return None
        return extension


@dataclass(frozen=True)
class KernelReport:
    """The kernel packages' status and the implementation behind every kernel-backed function of a model."""

    model: str
    device: str
    packages: tuple[PackageStatus, ...]
    uses: tuple[KernelUse, ...]
    hub_kernels: bool

    @property
    def fallbacks(self) -> tuple[KernelUse, ...]:
        """The functions that run transformers' torch code instead of a kernel."""
        return tuple(use for use in self.uses if not use.is_kernel)

    @property
    def broken(self) -> tuple[KernelUse, ...]:
        """Kernels that resolved but will raise when called (their compiled extension is missing)."""
        return tuple(use for use in self.uses if use.missing_extension is not None)

    @property
    def kernels_in_use(self) -> bool:
        """True when the model has kernel-backed functions, every one resolved to a working kernel, on CUDA."""
        return bool(self.uses) and not self.fallbacks and not self.broken and self.device.startswith("cuda")

    @property
    def summary(self) -> str:
        if not self.uses:
            return "no kernel-backed functions"
        if self.fallbacks:
            return f"torch fallbacks in use ({len(self.fallbacks)} of {len(self.uses)} functions)"
        if self.broken:
            return "kernels resolved, but some cannot run (see BROKEN)"
        if not self.device.startswith("cuda"):
            return "kernels resolved, but the model is not on a CUDA device"
        return "CUDA kernels in use"

    def __str__(self) -> str:
        lines = [f"{self.model} on {self.device}: {self.summary}"]
        for package in self.packages:
            state = f"version {package.version}" if package.importable else f"not importable ({package.error})"
            lines.append(f"  {package.name}: {state}")
        if self.hub_kernels:
            lines.append("  model kernelized with use_kernels=True: Hub kernels may replace the functions below")
        for use in self.uses:
            kind = "kernel" if use.is_kernel else "torch "
            layers = ",".join(map(str, use.layers))
            lines.append(f"  [{kind}] {use.mixer} (layers {layers}) {use.function} -> {use.implementation}")
            if use.missing_extension is not None:
                lines.append(
                    f"           BROKEN: needs the compiled extension {use.missing_extension!r}, which does not "
                    "import; "
                    "reinstall mamba-ssm with MAMBA_KEEP_CUDA_BUILD=TRUE (main branch) or without MAMBA_SKIP_CUDA_BUILD"
                )
        return "\n".join(lines)


def package_status(name: str) -> PackageStatus:
    """Try to import kernel package ``name`` (``mamba_ssm``, ``causal_conv1d``, ``fla``) and say what happened."""
    try:
        importlib.import_module(name)
    except Exception as error:  # any failure (missing, CUDA / ABI mismatch) makes transformers fall back
        return PackageStatus(name, None, f"{type(error).__name__}: {error}")
    try:
        version = importlib.metadata.version(KERNEL_DISTRIBUTIONS.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return PackageStatus(name, version, None)


def _resolved(function: Any) -> dict[str, Any] | None:
    """The closure of a ``use_kernel_func_from_hub_with_fallback`` wrapper (None for any other callable).

    Follows ``__wrapped__`` links, so a Hub-kernel wrapper around transformers' wrapper is seen through.
    """
    seen = 0
    while callable(function) and seen < 8:
        if inspect.isfunction(function):
            nonlocals = inspect.getclosurevars(function).nonlocals
            if {"implementation", "func_name", "package"} <= nonlocals.keys():
                return nonlocals
        function = getattr(function, "__wrapped__", None)
        seen += 1
    return None


def _qualified_name(function: Callable[..., Any]) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


def _kernel_functions(mixer_class: type) -> list[dict[str, Any]]:
    """The kernel-or-fallback functions the forward of ``mixer_class`` refers to, in the order it names them."""
    module = sys.modules[mixer_class.__module__]
    names = inspect.unwrap(mixer_class.forward).__code__.co_names
    found = []
    for name in dict.fromkeys(names):
        closure = _resolved(getattr(module, name, None))
        if closure is not None:
            found.append(closure)
    return found


def kernel_report(model: nn.Module) -> KernelReport:
    """Which kernels the recurrent mixers of ``model`` run.

    Mixers are the modules with a ``layer_idx`` whose forward calls kernel-or-fallback functions; a model
    without any (pure attention) gives an empty ``uses``.
    """
    layers_by_class: dict[type, list[int]] = {}
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            layers_by_class.setdefault(type(module), []).append(module.layer_idx)
    uses = []
    for mixer_class, layers in layers_by_class.items():
        for closure in _kernel_functions(mixer_class):
            uses.append(
                KernelUse(
                    mixer=mixer_class.__name__,
                    layers=tuple(sorted(set(layers))),
                    function=closure["func_name"],
                    package=closure["package"],
                    implementation=_qualified_name(closure["implementation"]),
                )
            )
    packages = tuple(package_status(name) for name in sorted({use.package for use in uses}))
    parameter = next(model.parameters(), None)
    device = str(parameter.device) if parameter is not None else "cpu"
    return KernelReport(
        model=type(model).__name__,
        device=device,
        packages=packages,
        uses=tuple(uses),
        hub_kernels=bool(getattr(model, "_use_kernels", False)),
    )
