"""Fast paths for hybrid models: kernel detection, single-pass branch-point capture, asynchronous state offload.

- :func:`kernel_report` (``python -m hf_marconi.kernels``): whether a model's mixers run mamba-ssm /
  causal-conv1d kernels or transformers' torch fallbacks.
- :func:`single_pass_prefill`: capture the states at branch points inside one prefill forward (Mamba2, gated
  delta net and short-conv families);
  None when the model needs two-pass capture.
- :class:`StateMover`: offload stored states to pinned CPU memory and prefetch them on a side CUDA stream.
"""

from .detect import KernelReport, KernelUse, PackageStatus, kernel_report, package_status
from .offload import PendingPayload, StateMover, map_payload
from .single_pass import (
    BranchCapture,
    capture_branch_states,
    recurrent_mixers,
    single_pass_prefill,
    supports_single_pass,
)

__all__ = [
    "BranchCapture",
    "KernelReport",
    "KernelUse",
    "PackageStatus",
    "PendingPayload",
    "StateMover",
    "capture_branch_states",
    "kernel_report",
    "map_payload",
    "package_status",
    "recurrent_mixers",
    "single_pass_prefill",
    "supports_single_pass",
]
