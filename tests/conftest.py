"""Settings shared by every test module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread: the zoo's tensors are tiny, and extra threads waiting on a busy 2-core CI machine make
    the model tests several times slower. Restored at the end of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def skip_unless_available(families):
    """Zoo families as pytest params, skipped with a reason where the installed transformers lacks them."""
    import transformers

    from hf_marconi.testing import is_available

    return [
        pytest.param(family, marks=pytest.mark.skipif(
            not is_available(family), reason=f"transformers {transformers.__version__} does not ship {family}"
        ))
        for family in families
    ]


def fresh_cache(model) -> dict:
    """Keyword arguments passing a fresh DynamicCache under the keyword the installed transformers takes: what
    uncached generation uses, without transformers' deprecation notice on 5.24."""
    from transformers import DynamicCache

    from hf_marconi.families import cache_keyword_of

    return {cache_keyword_of(model): DynamicCache(config=model.config)}
