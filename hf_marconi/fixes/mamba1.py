"""Mamba1 continuation from a cached SSM state, for Jamba's mixer.

transformers' Jamba mixer runs a multi-token forward with a selective scan that starts from a zero state (the
torch scan and mamba-ssm's ``selective_scan_fn`` both take no initial state), so a prefill that continues
from a populated cache ignores the cached recurrent state. The recurrence is linear in the state, so the
contribution of an initial state ``h0`` can be added on top of the zero-initial-state scan:

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t     =>     h_t = h_t|zero + (prod_{s<=t} exp(dt_s A)) h0
    y_t = C_t . h_t + D x_t                        =>     y_t = y_t|zero + C_t . (prod_{s<=t} exp(dt_s A)) h0

and prod_{s<=t} exp(dt_s A) = exp(A * cumsum_{s<=t} dt_s). The gate ``silu(z)`` multiplies y after that.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from packaging.specifiers import SpecifierSet

from ..conventions import CACHE_KEYWORDS, find_cache
from ..patching import patch_method
from .base import Fix
from .errors import UnsupportedModelError

# The functions of transformers' Jamba module the corrected forward calls. They dispatch to mamba-ssm /
# causal-conv1d kernels when those are installed, else to transformers' torch paths.
_KERNEL_FUNCTIONS = ("causal_conv1d_fn", "causal_conv1d_update", "mamba_selective_scan", "mamba_selective_state_update")


def mamba1_initial_state_correction(
    dt: torch.Tensor, A: torch.Tensor, C: torch.Tensor, initial_state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What an initial SSM state adds to a Mamba1 selective scan that started from zero.

    Args:
        dt: (batch, channels, seq_len) discretisation steps, after the dt bias and softplus.
        A: (channels, state_size) continuous state matrix (negative entries).
        C: (batch, state_size, seq_len) output projections.
        initial_state: (batch, channels, state_size) the state before the first token, h0.

    Returns:
        (y_correction, final_state_correction): (batch, channels, seq_len) to add to the scan's y before the
        z gate (after a gated scan, add ``y_correction * silu(z)``), and (batch, channels, state_size) to add to
        the scan's last state.
        Computed in the promotion of the inputs' dtype with float32 (as the scans do), so a bfloat16 model
        gets a float32 correction.
    """
    dtype = torch.promote_types(torch.promote_types(dt.dtype, initial_state.dtype), torch.float32)
    cumulative_dt = torch.cumsum(dt.to(dtype), dim=-1)  # (b, d, l)
    decay = torch.exp(cumulative_dt[..., None] * A.to(dtype)[None, :, None, :])  # (b, d, l, n)
    carried = decay * initial_state.to(dtype)[:, :, None, :]  # (b, d, l, n): h0 carried to each step
    y_correction = torch.einsum("bdln,bnl->bdl", carried, C.to(dtype))
    return y_correction, carried[:, :, -1]


def _previous_states(cache, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(conv state, SSM state) the cache holds for this layer from earlier tokens, or (None, None).

    Read from the layer itself: ``Cache.get_conv_state`` only exists from transformers 5.21.
    """
    if cache is None or not cache.has_previous_state(layer_idx):
        return None, None
    layer = cache.layers[layer_idx]
    return layer.conv_states[0], layer.recurrent_states[0]


def jamba_mixer_forward(
    mixer: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' ``JambaMambaMixer.forward`` (layered cache API, 5.17 to 5.24) with the cached SSM state honoured.

    Identical to the original except in the multi-token ("full sequence") branch: when the cache holds a
    recurrent state for this layer, the scan's output and final state get the initial-state correction. The cache
    comes under the release's keyword (``cache_params`` before 5.24, ``cache`` from 5.24).

    hidden_states: (batch, seq_len, hidden_size) -> (batch, seq_len, hidden_size).
    """
    cache = find_cache(kwargs)
    kwargs = {name: value for name, value in kwargs.items() if name not in CACHE_KEYWORDS}
    kernels = sys.modules[type(mixer).__module__]
    seq_len = hidden_states.shape[1]
    dtype = hidden_states.dtype
    conv_state, recurrent_state = _previous_states(cache, mixer.layer_idx)

    hidden_states = kernels.apply_mask_to_padding_states(hidden_states, attention_mask)
    projected_states = mixer.in_proj(hidden_states).transpose(1, 2)
    A = -torch.exp(mixer.A_log.float())
    hidden_states_B_C, gate = projected_states.chunk(2, dim=1)

    if conv_state is not None and seq_len == 1 and not cache.is_recording_past(mixer.layer_idx):
        hidden_states_B_C = kernels.causal_conv1d_update(
            hidden_states_B_C, conv_state, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
            activation=mixer.activation,
        )
    else:
        if cache is not None:
            hidden_states_B_C = cache.update_conv_state(
                hidden_states_B_C, mixer.layer_idx, conv_kernel_size=mixer.conv_kernel_size
            )
        hidden_states_B_C = kernels.causal_conv1d_fn(
            hidden_states_B_C, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, activation=mixer.activation,
            **kwargs,
        )
        if cache is not None:
            hidden_states_B_C = hidden_states_B_C[:, :, -seq_len:]

    hidden_states_B_C = kernels.apply_mask_to_padding_states(hidden_states_B_C.transpose(1, 2), attention_mask)
    time_step, B, C = torch.split(
        mixer.x_proj(hidden_states_B_C), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1
    )
    time_step = mixer.dt_layernorm(time_step)
    B = mixer.b_layernorm(B)
    C = mixer.c_layernorm(C)
    if hasattr(mixer.config, "_is_quantized"):
        time_step = (mixer.dt_proj(time_step) - mixer.dt_proj.bias).transpose(1, 2)
    else:
        time_step = mixer.dt_proj.weight @ time_step.transpose(1, 2)
    time_proj_bias = mixer.dt_proj.bias.float() if mixer.dt_proj.bias is not None else None

    if recurrent_state is not None and seq_len == 1:
        scan_output = kernels.mamba_selective_state_update(
            recurrent_state, hidden_states_B_C.transpose(1, 2)[..., 0], time_step[..., 0], A, B[:, 0], C[:, 0],
            mixer.D, z=gate[..., 0], dt_bias=time_proj_bias, dt_softplus=True,
        ).unsqueeze(-1)
    else:
        output_final_state = cache is not None
        scan_result = kernels.mamba_selective_scan(
            hidden_states_B_C.transpose(1, 2), time_step, A, B.transpose(1, 2), C.transpose(1, 2),
            D=mixer.D.float(), z=gate, delta_bias=time_proj_bias, delta_softplus=True,
            return_last_state=output_final_state, use_mambapy=mixer.use_mambapy,
            use_associative_scan=mixer.use_associative_scan,
        )
        if output_final_state:
            scan_output, final_state = scan_result
            if recurrent_state is not None:
                # The same dt the scan discretised with: bias added, then softplus.
                dt = time_step if time_proj_bias is None else time_step + time_proj_bias.to(time_step.dtype)[..., None]
                y_correction, state_correction = mamba1_initial_state_correction(
                    F.softplus(dt), A, C.transpose(1, 2), recurrent_state
                )
                scan_output = scan_output + (y_correction * F.silu(gate.to(y_correction.dtype))).to(scan_output.dtype)
                final_state = final_state + state_correction.to(final_state.dtype)
            cache.update_recurrent_state(final_state, mixer.layer_idx)
        else:
            scan_output = scan_result

    return mixer.out_proj(scan_output.transpose(1, 2).to(dtype))


def check_jamba_fix_applies(model: nn.Module) -> None:
    """Raise UnsupportedModelError when this transformers' Jamba mixer is not the one the fix was written for."""
    from transformers.models.jamba import modeling_jamba

    missing = [name for name in ("JambaMambaMixer", "apply_mask_to_padding_states", *_KERNEL_FUNCTIONS)
               if not hasattr(modeling_jamba, name)]
    if missing:
        raise UnsupportedModelError(
            f"hf_marconi's Jamba fix (continuing a multi-token forward from the cached SSM state) needs "
            f"transformers' layered-cache Jamba mixer, but this transformers lacks {', '.join(missing)}. "
            f"Install the transformers version range hf_marconi declares."
        )


def _hooked(forward):
    """``forward`` firing the accelerate hooks of the submodules whose weights it reads directly, as the
    original does (needed under accelerate offloading); unchanged where transformers has no such helper."""
    try:
        from transformers.integrations.accelerate import force_accelerate_hooks
    except ImportError:
        return forward
    return force_accelerate_hooks(["conv1d", "dt_proj"])(forward)


_CORRECTED_FORWARD = _hooked(jamba_mixer_forward)


def corrected_jamba_forward(mixer: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The patch installed on each Jamba mixer (it replaces ``forward`` whole)."""
    return _CORRECTED_FORWARD(mixer, *args, **kwargs)


def install_jamba_mixer_fix(model: nn.Module) -> int:
    """Replace the forward of every Jamba Mamba mixer in ``model`` (this instance only), skipping those already
    corrected. Returns how many mixers the model has."""
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer

    mixers = [module for module in model.modules() if isinstance(module, JambaMambaMixer)]
    for mixer in mixers:
        patch_method(mixer, "forward", corrected_jamba_forward)
    return len(mixers)


JAMBA_INITIAL_STATE = Fix(
    name="jamba_mamba1_initial_state",
    # Verified wrong on 5.23 and 5.24 (the 5.24 mixer differs only by the `cache` keyword).
    broken_in=SpecifierSet(">=5.15"),
    check=check_jamba_fix_applies,
    install=install_jamba_mixer_fix,
    why="the Mamba1 selective scan of a multi-token continuation starts from a zero state, ignoring the cached one",
)
