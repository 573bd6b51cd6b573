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
