"""The Prometheus collector exposes a cache's counters under serving-style names, read at scrape time."""

from __future__ import annotations

import pytest
import torch

from hf_marconi import MarconiCache
from hf_marconi.testing import build_model

prometheus_client = pytest.importorskip("prometheus_client")


def test_collector_exposes_the_counters_of_stats():
    from prometheus_client import CollectorRegistry, generate_latest

    from hf_marconi.metrics import MarconiCollector

    model = build_model("bamba")
    cache = MarconiCache(model, capacity_bytes=2**24)
    registry = CollectorRegistry()
    registry.register(MarconiCollector(cache, name="chat"))
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    first = model.generate(torch.randint(3, 250, (1, 16)), past_key_values=cache, **settings)
    model.generate(torch.cat([first, torch.tensor([[5, 6]])], dim=-1), past_key_values=cache, **settings)
    text = generate_latest(registry).decode()
    stats = cache.stats()
    assert text.count("# TYPE hf_marconi_prefix_cache_hits_total") <= 1
    assert f'hf_marconi_prefix_cache_hits_total{{cache="chat"}} {float(stats["hits"])}' in text
    assert f'hf_marconi_prefix_cache_hit_tokens_total{{cache="chat"}} {float(stats["hit_tokens"])}' in text
    assert f'hf_marconi_prefix_cache_usage_bytes{{cache="chat"}} {float(stats["bytes"])}' in text
    assert stats["hits"] == 1


def test_one_collector_serves_several_caches_with_one_family_per_metric():
    from prometheus_client import CollectorRegistry, generate_latest

    from hf_marconi.metrics import MarconiCollector

    model = build_model("bamba")
    caches = {"chat": MarconiCache(model, capacity_bytes=2**24), "agents": MarconiCache(model, capacity_bytes=2**23)}
    registry = CollectorRegistry()
    registry.register(MarconiCollector(caches))
    text = generate_latest(registry).decode()
    assert text.count("# TYPE hf_marconi_prefix_cache_capacity_bytes gauge") == 1
    assert 'hf_marconi_prefix_cache_capacity_bytes{cache="chat"} 1.6777216e+07' in text
    assert 'hf_marconi_prefix_cache_capacity_bytes{cache="agents"} 8.388608e+06' in text
