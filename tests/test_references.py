"""The human-feedback references' settings and data: which human comparisons each reference's PM
learns from, and that its PM learns from nothing else."""

from __future__ import annotations

import pytest
from human_data import write_jsonl

from cai_lib.core.errors import CaiError
from cai_lib.method.preference_model import PreferenceModelConfig
from cai_lib.method.references import ReferencesConfig, reference_pairs, reference_pm_settings
from cai_lib.platform.run_config import load_run_config


def rows(kind: str, n: int) -> list[dict]:
    return [
        {"chosen": f"\n\nHuman: {kind} {i}?\n\nAssistant: Kind.", "rejected": f"\n\nHuman: {kind} {i}?\n\nAssistant: Rude."}
        for i in range(n)
    ]


@pytest.fixture
def sources(tmp_path) -> ReferencesConfig:
    return ReferencesConfig(
        helpful_pairs=write_jsonl(tmp_path / "helpful.jsonl", rows("helpful", 5)),
        harmless_pairs=write_jsonl(tmp_path / "harmless.jsonl", rows("harmless", 5)),
        num_pairs=3,
    )


def test_the_helpful_only_reference_learns_from_human_helpfulness_comparisons_alone(sources):
    pairs = reference_pairs("helpful-rlhf", sources)
    assert [p.prompt.strip() for p in pairs] == [f"Human: helpful {i}?" for i in range(3)]


def test_the_hh_reference_learns_from_as_many_harmlessness_as_helpfulness_comparisons(sources):
    pairs = reference_pairs("hh-rlhf", sources)
    assert [p.prompt.split()[1] for p in pairs] == ["helpful"] * 3 + ["harmless"] * 3


def test_a_references_human_pairs_put_the_humans_choice_first(sources):
    assert {(p.source, p.label, p.answer_a) for p in reference_pairs("hh-rlhf", sources)} == {("human", 1.0, "Kind.")}


def test_a_reference_pm_learns_from_human_pairs_only():
    settings = reference_pm_settings(PreferenceModelConfig(human_fraction=0.425, learning_rate=2e-5))
    assert (settings.human_fraction, settings.learning_rate) == (1.0, 2e-5)


def test_references_are_off_by_default_and_in_the_quick_demo():
    assert load_run_config(None).params.references.policies == []


def test_a_reference_named_twice_is_refused():
    with pytest.raises(CaiError, match=r"field 'params.references.policies': .*names a reference twice"):
        load_run_config(None, ["references.policies=[hh-rlhf, hh-rlhf]"])


def test_an_unknown_reference_is_refused():
    with pytest.raises(CaiError, match=r"field 'params.references.policies.0'"):
        load_run_config(None, ["references.policies=[rlhf]"])
