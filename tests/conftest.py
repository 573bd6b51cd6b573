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


def run_in_threads(worker, count: int, timeout_s: float = 240.0) -> None:
    """Run ``worker(i)`` in ``count`` threads at once, wait for all (failing if one hangs), and re-raise the first
    exception any of them raised."""
    import threading

    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            worker(index)
        except BaseException as error:  # surfaced in the calling thread
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    assert not any(thread.is_alive() for thread in threads), "a worker thread hung"
    if errors:
        raise errors[0]
