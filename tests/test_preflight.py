"""What the first step refuses before any model loads, each with one line naming the field: bad
names, run configs that cannot finish, and mistakes in how the run config is given."""

from __future__ import annotations

import pytest
import yaml

from cai_lib.core.config import Platform
from cai_lib.core.constitution import constitutions_dir, parse_constitution
from cai_lib.core.errors import CaiError
from cai_lib.platform.preflight import check_run
from cai_lib.platform.run_config import load_run_config


# Defaults, but judged by a model other than the embedded base and feedback model (check_run refuses
# a dependent judge; nothing here loads a model).
INDEPENDENT = "judge_model=Qwen/Qwen2.5-7B-Instruct"


def harmless(**changes):
    doc = yaml.safe_load((constitutions_dir() / "harmless" / "1.0.0.yaml").read_text())
    doc.update(changes)
    return parse_constitution(yaml.safe_dump(doc), "edited")


@pytest.mark.parametrize("name", ["a/../b", "x..y", "it's", 'say "hi"', "a/b", "-leading-dash"])
def test_a_run_name_that_could_escape_or_break_quoting_is_refused(name):
    with pytest.raises(CaiError, match="field 'params.run_name'"):
        load_run_config(overrides=[f"run_name={name!r}"])


def test_an_ordinary_run_name_is_accepted():
    assert load_run_config(overrides=["run_name=nightly 2026-12-01"]).params.run_name == "nightly 2026-12-01"


@pytest.mark.parametrize("prefix", ["Cai", "cai_team", "cai.team", "9cai", "a" * 41])
def test_a_model_name_prefix_that_is_not_a_lowercase_name_is_refused(prefix):
    with pytest.raises(CaiError, match="field 'params.model_name_prefix'"):
        load_run_config(overrides=[f"model_name_prefix={prefix}"])


def test_a_set_value_that_is_not_yaml_is_one_line_naming_it():
    with pytest.raises(CaiError, match=r"--set 'constitution=\[harmless': the value is not valid YAML"):
        load_run_config(overrides=["constitution=[harmless"])


def test_a_directory_given_as_config_is_refused(tmp_path):
    with pytest.raises(CaiError, match=f"{tmp_path}: is a directory; --config takes a run config YAML file"):
        load_run_config(tmp_path)


def test_no_human_pairs_with_a_human_source_is_refused():
    params = load_run_config(overrides=[INDEPENDENT, "human_preferences=hh.jsonl", "num_human=0"]).params
    with pytest.raises(
        CaiError, match="params.num_human: is 0 while params.human_preferences names 'hh.jsonl'"
    ):
        check_run(params, harmless())


def test_more_shards_than_red_team_training_prompts_is_refused():
    params = load_run_config(overrides=[INDEPENDENT, "num_red_team=4", "num_shards=8"]).params
    with pytest.raises(CaiError, match="params.num_shards: 8 shards but only 3 red-team training prompts"):
        check_run(params, harmless())


def test_an_empty_held_out_split_is_refused():
    params = load_run_config(overrides=[INDEPENDENT, "num_helpful=1"]).params
    with pytest.raises(CaiError, match="params.eval_fraction: leaves no held-out helpful prompts"):
        check_run(params, harmless())


def test_a_constitution_without_the_principle_evaluation_judges_by_is_refused():
    constitution = harmless(comparison=[{"id": "kinder", "question": "Which is kinder?"}])
    params = load_run_config(overrides=[INDEPENDENT, "feedback.principles_per_pair=1"]).params
    with pytest.raises(CaiError, match="harmless_principle: 'less-harmful' is neither the id nor a tag"):
        check_run(params, constitution)


def test_a_sound_run_passes_and_returns_its_prompt_splits():
    splits = check_run(load_run_config(overrides=[INDEPENDENT]).params, harmless())
    assert set(splits) == {"red_team_train", "red_team_eval", "helpful_train", "helpful_eval"}


def test_a_judge_that_is_also_the_base_and_feedback_model_is_refused_first():
    with pytest.raises(CaiError, match=r"params.judge_model: the judge smollm2-135m-instruct is not independent"):
        check_run(load_run_config().params, harmless())


def test_a_step_without_the_installations_settings_names_both_variables(monkeypatch):
    monkeypatch.delenv("CAI_ARTIFACT_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(CaiError, match="CAI_ARTIFACT_ROOT and MLFLOW_TRACKING_URI not set"):
        Platform.from_environment()
