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
