import os

import pytest
import torch

import amlp


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ALL_MIXERS = [info.name for info in amlp.list_mixers()]


def chosen(name: str) -> dict:
    """The test's choice for options without a default (AMLP's form): the stable form, which has
    both a causal and a non-causal version. The form-specific suites test every form."""
    caps = amlp.layers.get_mixer_info(name).capabilities
    return {option: "stable" if "stable" in values else values[0] for option, values in caps.choices}


def default_causal(name: str) -> bool:
    """Build causal only when the mixer has no non-causal form."""
    return not amlp.layers.get_mixer_info(name).capabilities.noncausal


def shared_data_dir():
    """The shared data folder (``AMLP_DATA_DIR`` or ``../shared/data`` beside the checkout)."""
    env = os.environ.get("AMLP_DATA_DIR")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "shared", "data"))
