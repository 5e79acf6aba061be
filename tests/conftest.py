"""Shared test fixtures: the reference models and outputs in ../shared/fixtures."""

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not (FIXTURES / "README.md").is_file():
        pytest.skip(f"reference fixtures not found at {FIXTURES}; put the shared folder beside "
                    "the repo (../shared/fixtures) to run the numerical tests")
    return FIXTURES


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute error relative to the largest magnitude of the expected tensor."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# The fixture models as the pipeline, the Python API and the CLI take them


@pytest.fixture(scope="session")
def model_files(fixtures) -> dict:
    """The four fixture model files as `CCLDPipeline.from_files` keyword arguments."""
    return {"unet": fixtures / "unet.ckpt", "autoencoder": fixtures / "autoencoder.ckpt",
            "cloob": fixtures / "cloob.pkl", "cloob_config": fixtures / "cloob.json"}


@pytest.fixture(scope="session")
def model_flags(model_files) -> list[str]:
    """The same files as `ccld generate` options: --unet ... --cloob-config ..."""
    return [arg for key, path in model_files.items()
            for arg in (f"--{key.replace('_', '-')}", str(path))]


@pytest.fixture(scope="session")
def fixture_pipeline(model_files):
    """One fp32 CPU pipeline of the fixture models, shared: tests must not change its settings
    (build your own from `model_files` to do that)."""
    from ccld import CCLDPipeline

    return CCLDPipeline.from_files(**model_files)
