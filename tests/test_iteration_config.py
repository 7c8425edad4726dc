"""The iteration section of the run config: each later round's settings are the run's with that
round's overrides merged over them, and overrides that name no later round or a bad field are
refused when the config is read."""

from __future__ import annotations

import pytest

from cai_lib.core.errors import CaiError
from cai_lib.platform.run_config import load_run_config


def params(*overrides: str):
    return load_run_config(overrides=list(overrides)).params


def test_a_rounds_override_changes_that_round_only():
    p = params("rounds=3", 'iteration.overrides={"3": {rl: {steps: 8}}}')
    assert [p.for_round(k).rl.steps for k in (1, 2, 3)] == [p.rl.steps, p.rl.steps, 8]


def test_an_override_keeps_the_sections_other_fields_and_seed():
    p = params("rounds=2", 'iteration.overrides={"2": {rl: {steps: 8}}}')
    assert p.for_round(2).rl.model_dump(exclude={"steps"}) == p.rl.model_dump(exclude={"steps"})


def test_an_override_of_a_round_the_run_does_not_have_is_refused():
    with pytest.raises(CaiError, match=r"iteration\.overrides: round '3' is not one of the later rounds 2\.\.2"):
        params("rounds=2", 'iteration.overrides={"3": {rl: {steps: 8}}}')


def test_round_one_cannot_be_overridden_since_the_runs_sections_are_round_ones():
    with pytest.raises(CaiError, match=r"round '1' is not one of the later rounds"):
        params("rounds=2", 'iteration.overrides={"1": {rl: {steps: 8}}}')


def test_an_override_with_an_unknown_or_bad_field_is_refused_naming_it():
    with pytest.raises(CaiError, match=r"iteration\.overrides\.2\.rl\.stepz: Extra inputs are not permitted"):
        params("rounds=2", 'iteration.overrides={"2": {rl: {stepz: 8}}}')
    with pytest.raises(CaiError, match=r"iteration\.overrides\.2\.sample_pairs\.temperature: Input should be greater than 0"):
        params("rounds=2", 'iteration.overrides={"2": {sample_pairs: {temperature: 0}}}')
