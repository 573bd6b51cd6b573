"""Prometheus metrics of a MarconiCache, in the names and style serving users know (``pip install
"hf_marconi[metrics]"``)::

    from prometheus_client import REGISTRY, start_http_server
    from hf_marconi.metrics import MarconiCollector

    REGISTRY.register(MarconiCollector({"chat": chat_cache, "agents": agent_cache}))
    start_http_server(9400)

Counters (``_total``) and gauges are read from ``cache.stats()`` at each scrape, so nothing is recorded per call and
a scrape never waits for a model call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .cache import MarconiCache

# (metric name, stats key, help): counters, then gauges.
_COUNTERS = (
    ("hf_marconi_prefix_cache_queries", "lookups", "Calls that looked their prompt up."),
    ("hf_marconi_prefix_cache_hits", "hits", "Calls that restored a stored prefix."),
    ("hf_marconi_prefix_cache_query_tokens", "input_tokens", "Prompt tokens looked up."),
    ("hf_marconi_prefix_cache_hit_tokens", "hit_tokens", "Prompt tokens restored instead of prefilled."),
    ("hf_marconi_prefix_cache_unresumable_tokens", "unresumable_tokens",
     "Prompt tokens matched past the deepest checkpoint: cached, but prefilled again."),
    ("hf_marconi_prefix_cache_unresumable_queries", "unresumable_lookups",
     "Calls whose prompt matched stored tokens past the deepest checkpoint."),
    ("hf_marconi_prefix_cache_bypassed_calls", "bypassed_calls", "Calls that ran without reuse."),
    ("hf_marconi_prefix_cache_evicted_nodes", "nodes_evicted", "Tree nodes evicted."),
    ("hf_marconi_prefix_cache_admitted_checkpoints", "checkpoints_admitted", "Recurrent-state checkpoints stored."),
    ("hf_marconi_prefix_cache_refused_admissions", "admissions_refused", "Commits that could not fit."),
    ("hf_marconi_prefix_cache_invalidations", "invalidations", "Stores dropped after a weight change."),
    ("hf_marconi_prefix_cache_saved_flops", "flops_saved", "Prefill FLOPs avoided by hits."),
)
_GAUGES = (
    ("hf_marconi_prefix_cache_usage_bytes", "bytes", "Bytes of stored states."),
    ("hf_marconi_prefix_cache_capacity_bytes", "capacity_bytes", "Capacity of the store in bytes."),
    ("hf_marconi_prefix_cache_hit_rate", "token_hit_rate", "Share of prompt tokens restored."),
    ("hf_marconi_prefix_cache_alpha", "alpha", "Marconi's FLOP-efficiency weight."),
)


class MarconiCollector:
    """A ``prometheus_client`` collector of the counters of one or several caches, each sample labelled with its
    cache's name (one collector per registry: each metric family appears once, with one sample per cache)."""

    def __init__(self, caches: "Mapping[str, MarconiCache] | MarconiCache", name: str = "default") -> None:
        self.caches = dict(caches) if isinstance(caches, Mapping) else {name: caches}

    def collect(self) -> Iterator[Metric]:
        stats = {name: cache.stats() for name, cache in self.caches.items()}
        for kind, table in ((CounterMetricFamily, _COUNTERS), (GaugeMetricFamily, _GAUGES)):
            for metric, key, help_text in table:
                family = kind(metric, help_text, labels=["cache"])
                for name, values in stats.items():
                    if values.get(key) is not None:
                        family.add_metric([name], float(values[key]))
                yield family
