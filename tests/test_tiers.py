"""The test tiers (docs/testing.md): the fixtures that mark a test `server`, `model` or `pipeline`
exist under the names tests/conftest.py gives them, and `make test-fast` leaves out exactly the tiers
the conftest checks at run time."""

from __future__ import annotations

import importlib
import re

import pytest
from conftest import REPO_ROOT, SLOW_TIERS, TIER_FIXTURES


@pytest.mark.parametrize("key", [key for keys in TIER_FIXTURES.values() for key in keys])
def test_each_tier_fixture_is_a_fixture_of_its_module(key):
    # A renamed or moved fixture would stop marking its tests, and the fast tier would start running them.
    module, name = key.rsplit(".", 1)
    fixture = getattr(importlib.import_module(module), name, None)
    assert fixture is not None and type(fixture).__name__ == "FixtureFunctionDefinition", key


def test_make_test_fast_leaves_out_the_slow_tiers():
    makefile = (REPO_ROOT / "Makefile").read_text()
    expression = re.search(r"^SLOW_TIERS := (.+)$", makefile, re.MULTILINE).group(1)
    assert tuple(expression.split(" or ")) == SLOW_TIERS
    assert '$(PYTEST) -m "not ($(SLOW_TIERS))"' in makefile


def test_every_tier_is_a_declared_marker(pytestconfig):
    declared = {line.split(":", 1)[0] for line in pytestconfig.getini("markers")}
    assert set(SLOW_TIERS) <= declared
