"""Shared fixtures: every backend test runs on NumPy and on CuPy (skipped with a reason without a GPU)."""

import os

import pytest
from hypothesis import HealthCheck, settings

from npgpt import backend
from optional import need

_shared = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=20, derandomize=True, **_shared)
settings.register_profile("thorough", max_examples=200, **_shared)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=["cpu", "gpu"])
def device(request):
    """Run the test with new arrays made on this device; restores the previous device afterwards."""
    if request.param == "gpu":
        reason = backend.gpu_unavailable_reason()
        if reason:
            pytest.skip(f"CuPy backend unavailable: {reason}")
    previous = backend.get_device()
    backend.set_device(request.param)
    yield request.param
    backend.set_device(previous)


@pytest.fixture
def xp(device):
    """The array module of the test's device."""
    return backend.current()


@pytest.fixture
def torch():
    """PyTorch, or a skip with the reason (CI installs the CPU build, so the parity tests run there)."""
    return need("torch", "torch")



@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small training text (the first 20,000 characters of the bundled corpus) as a file path."""
    from npgpt.program.data import bundled_corpus_path
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(open(bundled_corpus_path(), encoding="utf-8").read()[:20000], encoding="utf-8")
    return str(path)


@pytest.fixture
def fast_paths_on():
    """For tests of the fast paths themselves: on for the test, also in a run with NPGPT_FAST=0."""
    from npgpt import engine
    previous = engine.set_fast_paths_enabled(True)
    yield
    engine.set_fast_paths_enabled(previous)
