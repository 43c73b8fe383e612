"""Fixtures of the deployment tests: one render per value set, shared by every test module."""

from __future__ import annotations

import pytest
from deploy.chartkit import ALL_VALUE_SETS, VALUE_SETS, Rendered, render


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return render(request.param)


@pytest.fixture(scope="module", params=sorted(ALL_VALUE_SETS))
def rendered_any(request: pytest.FixtureRequest) -> Rendered:
    return render(request.param)
