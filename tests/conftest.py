import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# The CLI prints plain text 160 columns wide unless COLUMNS says otherwise, and the golden
# files are that text. pytest-xdist's workers set COLUMNS=80 (and a terminal may set its
# own): the suite fixes the width so in-process CLI calls print the same text everywhere.
os.environ["COLUMNS"] = "160"

# The suite runs two workers on two shared cores: generation speed and per-example time are the
# machine's load, not a defect of the code under test (the examples themselves are the test).
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files from current output")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden")) or os.environ.get("UPDATE_GOLDEN") == "1"
