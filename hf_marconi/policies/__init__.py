"""Policies over the prefix tree, each an admission rule and an eviction rule (``ComposedPolicy``): Marconi, SGLang+
(LRU), vLLM+ (blocks), no cache, or any other pairing of the rules; alpha tuning."""

from hf_marconi.policies.alpha import PAPER_ALPHA_GRID, WIDE_ALPHA_GRID, AlphaTuner, Tuner, TuningRecord, oracle_alpha
from hf_marconi.policies.admission import BlockAdmission, BranchPointAdmission, MarconiAdmission, NoAdmission
from hf_marconi.policies.base import AdmissionRule, CostModel, EvictionRule, Policy
from hf_marconi.policies.composed import ComposedPolicy
from hf_marconi.policies.efficiency import flop_efficiency
from hf_marconi.policies.lru import LRUEviction
from hf_marconi.policies.marconi import MarconiEviction
from hf_marconi.policies.paper import BlockPolicy, LRUPolicy, MarconiPolicy, NoCachePolicy
from hf_marconi.policies.shadow import SHADOW_ALPHA_GRID, ShadowAlphaTuner, SwitchRecord

__all__ = [
    "PAPER_ALPHA_GRID",
    "SHADOW_ALPHA_GRID",
    "WIDE_ALPHA_GRID",
    "AdmissionRule",
    "AlphaTuner",
    "BlockAdmission",
    "BlockPolicy",
    "BranchPointAdmission",
    "ComposedPolicy",
    "CostModel",
    "EvictionRule",
    "LRUEviction",
    "LRUPolicy",
    "MarconiAdmission",
    "MarconiEviction",
    "MarconiPolicy",
    "NoAdmission",
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
