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

# XSTest's prompts default to the hub copy, which the tests cannot reach: left out unless a test
# gives them.
NO_XSTEST = "evaluate.xstest.prompts="


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
    params = load_run_config(overrides=[INDEPENDENT, "num_red_team=4", "num_shards=8", NO_XSTEST]).params
    with pytest.raises(CaiError, match="params.num_shards: 8 shards but only 3 red-team training prompts"):
        check_run(params, harmless())


def test_an_empty_held_out_split_is_refused():
    params = load_run_config(overrides=[INDEPENDENT, "num_helpful=1", NO_XSTEST]).params
    with pytest.raises(CaiError, match="params.eval_fraction: leaves no held-out helpful prompts"):
        check_run(params, harmless())


def test_a_constitution_without_the_principle_evaluation_judges_by_is_refused():
    constitution = harmless(comparison=[{"id": "kinder", "question": "Which is kinder?"}])
    params = load_run_config(overrides=[INDEPENDENT, "label.principles_per_pair=1"]).params
    with pytest.raises(CaiError, match="harmless_principle: 'less-harmful' is neither the id nor a tag"):
        check_run(params, constitution)


def test_a_sound_run_passes_and_returns_its_prompt_splits():
    splits = check_run(load_run_config(overrides=[INDEPENDENT, NO_XSTEST]).params, harmless())
    assert set(splits) == {"red_team_train", "red_team_eval", "helpful_train", "helpful_eval", "xstest"}
    assert splits["xstest"] == []


def test_xstest_prompts_are_read_with_the_runs_subset(tmp_path):
    source = tmp_path / "xstest.csv"
    rows = [f"{i},Prompt {i}?,{'contrast_' if i % 2 else ''}homonyms,{'unsafe' if i % 2 else 'safe'},f,n" for i in range(6)]
    source.write_text("id,prompt,type,label,focus,note\n" + "\n".join(rows) + "\n")
    overrides = [INDEPENDENT, f"evaluate.xstest.prompts={source}", "evaluate.xstest.limit=4"]
    splits = check_run(load_run_config(overrides=overrides).params, harmless())
    assert sorted(p.label for p in splits["xstest"]) == ["safe", "safe", "unsafe", "unsafe"]


def test_an_unreachable_xstest_source_is_refused_before_any_work_naming_the_field(tmp_path, monkeypatch, hub_offline):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CaiError, match=r"params.evaluate.xstest.prompts: hf:walledai/XSTest: cannot load .*local copy"):
        check_run(load_run_config(overrides=[INDEPENDENT]).params, harmless())


def test_a_judge_that_is_also_the_base_and_feedback_model_is_refused_first():
    with pytest.raises(CaiError, match=r"params.judge_model: the judge smollm2-135m-instruct is not independent"):
        check_run(load_run_config().params, harmless())


def test_a_step_without_the_installations_settings_names_both_variables(monkeypatch):
    monkeypatch.delenv("CAI_ARTIFACT_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(CaiError, match="CAI_ARTIFACT_ROOT and MLFLOW_TRACKING_URI not set"):
        Platform.from_environment()


# -- generated prompts and iterated CAI -----------------------------------------------------------------


def test_fewer_training_prompts_than_the_few_shot_size_is_refused_naming_the_kind():
    params = load_run_config(
        overrides=[INDEPENDENT, "num_helpful=4", "generate_prompts.few_shot=4", "generate_prompts.helpful.candidates=2", NO_XSTEST]
    ).params
    with pytest.raises(CaiError, match=r"^params\.generate_prompts\.helpful: 3 seed prompt\(s\), fewer than few_shot 4"):
        check_run(params, harmless())


def test_a_kind_that_generates_nothing_needs_no_seeds_beyond_its_split():
    params = load_run_config(overrides=[INDEPENDENT, "num_helpful=4", "generate_prompts.few_shot=4", NO_XSTEST]).params
    assert check_run(params, harmless())


def test_a_held_out_set_for_generation_that_cannot_be_read_is_refused(tmp_path):
    params = load_run_config(overrides=[INDEPENDENT, f"generate_prompts.held_out=[{tmp_path / 'missing.jsonl'}]", NO_XSTEST]).params
    with pytest.raises(CaiError, match=r"^params\.generate_prompts\.held_out: .*missing\.jsonl"):
        check_run(params, harmless())


def test_labels_by_the_policy_judged_by_the_base_model_are_refused():
    allowed = ["evaluate.allow_dependent_judge=true", "evaluate.dependent_judge_reason=a test"]
    params = load_run_config(overrides=[*allowed, "rounds=2", "iteration.feedback_follows_policy=true", NO_XSTEST]).params
    with pytest.raises(CaiError, match=r"^params\.iteration\.feedback_follows_policy: .*judge_model"):
        check_run(params, harmless())


def test_labels_by_the_policy_with_an_independent_judge_pass():
    params = load_run_config(
        overrides=["rounds=2", "iteration.feedback_follows_policy=true", "judge_model=other-model", NO_XSTEST]
    ).params
    assert check_run(params, harmless())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rounds=0", r"field 'params\.rounds': Input should be greater than or equal to 1"),
        ("generate_prompts.dedup_threshold=0", r"field 'params\.generate_prompts\.dedup_threshold': .*greater than 0"),
        ("generate_prompts.dedup_threshold=1.2", r"'params\.generate_prompts\.dedup_threshold': .*less than or equal to 1"),
    ],
)
def test_rounds_below_one_and_a_dedup_threshold_outside_zero_one_are_one_line_errors(override, message):
    with pytest.raises(CaiError, match=message) as err:
        load_run_config(overrides=[override])
    assert "\n" not in str(err.value)


def test_a_run_whose_rounds_differ_from_the_compiled_pipelines_is_refused_before_anything_loads(tmp_path):
    from cai_lib.platform.run_config import params_as_pipeline_arguments
    from cai_lib.steps.resolve import resolve

    arguments = params_as_pipeline_arguments(load_run_config(overrides=[INDEPENDENT, "rounds=3"]).params)
    with pytest.raises(SystemExit, match=r"params\.rounds: 3, but this pipeline was compiled with 2 round"):
        resolve(arguments, "run-1", "run", str(tmp_path / "constitution.yaml"), compiled_rounds=2)
