"""Fixtures shared by several test modules: one intra-op thread, and the tiny models (random weights, byte
tokenizers). The models are module-scoped: a module may prune or fine-tune them in place, and the next module
gets fresh ones."""
import pytest
import torch

from ecoflap_utils.models import load_model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine those threads spin.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def clip():
    return load_model("tiny-clip")


@pytest.fixture(scope="module")
def blip_t5():
    return load_model("tiny-blip2-t5")


@pytest.fixture(scope="module")
def blip_opt():
    return load_model("tiny-blip2-opt")


@pytest.fixture(scope="session")
def mini_blip2():
    """The bundled mini-blip2 (about 40 s to load on one thread), shared by the modules that only read it:
    a test must not prune or train it."""
    return load_model("mini-blip2")


# The two whole-grid notebook runs take most of the suite's time. `make test` runs pytest with two workers
# (pytest-xdist, one thread each); started first, they go one to each worker and the rest of the suite fills in
# around them, so the suite takes about as long as the longer of the two.
SLOW_FIRST = ("test_every_notebook_runs_on_the_tiny_models", "test_smoke_grid_on_the_bundled_models")


def pytest_collection_modifyitems(config, items):
    first = [it for it in items if it.name in SLOW_FIRST]
    items[:] = first + [it for it in items if it.name not in SLOW_FIRST]
