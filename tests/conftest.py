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
