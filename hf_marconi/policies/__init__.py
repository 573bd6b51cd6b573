"""Admission and eviction policies over the prefix tree: Marconi, SGLang+ (LRU), vLLM+ (blocks), no cache, alpha tuning."""

from hf_marconi.policies.alpha import PAPER_ALPHA_GRID, WIDE_ALPHA_GRID, AlphaTuner, Tuner, TuningRecord, oracle_alpha
from hf_marconi.policies.base import CostModel, Policy
from hf_marconi.policies.block import BlockPolicy
from hf_marconi.policies.lru import LRUPolicy
from hf_marconi.policies.efficiency import flop_efficiency
from hf_marconi.policies.marconi import MarconiPolicy
from hf_marconi.policies.nocache import NoCachePolicy
from hf_marconi.policies.shadow import SHADOW_ALPHA_GRID, ShadowAlphaTuner, SwitchRecord

__all__ = [
    "PAPER_ALPHA_GRID",
    "SHADOW_ALPHA_GRID",
    "WIDE_ALPHA_GRID",
    "AlphaTuner",
    "BlockPolicy",
    "CostModel",
    "LRUPolicy",
    "MarconiPolicy",
    "NoCachePolicy",
    "Policy",
    "ShadowAlphaTuner",
    "SwitchRecord",
    "Tuner",
    "TuningRecord",
    "default_policy",
    "flop_efficiency",
    "make_policy",
    "oracle_alpha",
]


def make_policy(name: str, **kwargs) -> Policy:
    """A policy by its report name: "marconi", "sglang+", "vllm+" or "no-cache"."""
    makers = {"marconi": MarconiPolicy, "sglang+": LRUPolicy, "vllm+": BlockPolicy, "no-cache": NoCachePolicy}
    if name not in makers:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(makers)}")
    return makers[name](**kwargs)


def default_policy() -> tuple[Policy, Tuner]:
    """The policy a ``MarconiCache`` runs when given none, and its alpha tuner: Marconi, alpha tuned online by shadow
    replays over :data:`SHADOW_ALPHA_GRID` (:class:`ShadowAlphaTuner`).

    The capacity planner (``python -m eval plan``) replays traces through exactly this pair, so a plan and a live
    cache built with defaults cannot drift apart. Each call returns fresh objects (a tuner keeps state)."""
    return MarconiPolicy(), ShadowAlphaTuner()
