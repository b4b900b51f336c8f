"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch
from lm_models import MODEL_KINDS, tiny_model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: thread hand-offs cost more than they save, badly so on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", params=MODEL_KINDS)
def tiny_lm(request):
    """A tiny random TransformerLens model (shape in lm_models.py), once per kind the installed
    TransformerLens offers: ``HookedTransformer`` and/or ``TransformerBridge``."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def default_lm():
    """The embedded default language model (SmolLM2-135M), loaded once per test session."""
    from switch_sae.activations import load_default_model

    return load_default_model()


@pytest.fixture
def patched_lm(monkeypatch, default_lm):
    """Make the CLI and the demo reuse ``default_lm`` instead of loading the model again."""
    from switch_sae.activations import pipeline
    from switch_sae.experiments import demo

    for module in (pipeline, demo):
        monkeypatch.setattr(module, "load_language_model", lambda cfg: default_lm)
    return default_lm
