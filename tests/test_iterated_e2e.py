"""Iterated CAI end to end through kfp.local, with tiny models, a local artifact directory and a
SQLite MLflow registry, three pipeline runs in one working directory:

1. two rounds, a gate every round passes: each round's models are registered with their round
   and parent, the lineage reads as a chain, the report rates every round on one Elo scale;
2. the same run with only round 2's RL settings changed: round 1 is reused whole, and round 2's
   RL and what follows it run again;
3. a gate no policy can pass (under model names of its own): round 1 fails it, so round 2 never
   runs and no champion is set.

Two rounds are the fewest that chain a round to a round before it; a third would add only more of
the same tasks (tests/test_pipeline_compile.py and tests/test_ir_types.py check the compiled DAG
of more rounds).

Generated prompts are on, so the stage runs and its prompts reach training. Each run is a module
fixture; each test asserts one thing of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from run_configs import TINY_GENERATED_PROMPTS

from cai_lib.core.config import local_platform
from cai_lib.core.model_versions import ancestors, list_models, version_by_alias
from cai_lib.core.names import candidates_name
from cai_lib.core.records import GeneratedPrompt, Trace
from cai_lib.core.shards import read_dataset
from cai_lib.core.store import ArtifactStore
from cai_lib.platform.preflight import prompt_splits
from cai_lib.platform.run_config import load_run_config
from pipelines.fork_server import kept_servers
from pipelines.local import run_local

pytestmark = pytest.mark.integration

ROUND_STAGES = ("sample_pairs", "label", "merge_labels", "train_pm", "rl", "answer_eval", "merge_answers", "evaluate")


def iterated_config(path: Path, model: Path, **params) -> Path:
    """Two rounds with every size cut to the bone, generated prompts on."""
    values = {
        "base_model": str(model),
        "feedback_model": str(model),
        "judge_model": str(model),
        "num_red_team": 12,  # 9 train / 3 eval
        "num_helpful": 6,
        "num_shards": 1,
        "rounds": 2,
        "experiment": "iterated",
        "generate_prompts": TINY_GENERATED_PROMPTS,
        "critique_revise": {"rounds": 1, "max_new_tokens": 8, "batch_size": 4},
        "sft": {"max_steps": 1, "batch_size": 2, "max_length": 96},
        "sample_pairs": {"max_new_tokens": 4, "batch_size": 4},
        "label": {"principles_per_pair": 1, "batch_size": 4},
        "train_pm": {"batch_size": 2, "max_length": 96, "eval_fraction": 0.2},
        "rl": {"steps": 1, "batch_size": 2, "num_generations": 2, "max_new_tokens": 4, "eval_prompts": 2, "max_length": 96},
        "evaluate": {
            "max_new_tokens": 4,
            "batch_size": 4,
            "num_samples_in_report": 1,
            "elo_bootstrap_samples": 20,
            "xstest": {"prompts": "builtin:refusal_contrast", "limit": 2},
            "allow_dependent_judge": True,
            "dependent_judge_reason": "tests: one tiny random model plays every part",
        },
        "validate_labels": {"sources": ["builtin:comparisons"], "limit": 2},
        # Three held-out prompts show nothing at 95%: a gate every round passes.
        "promotion": {"min_harmless_win_rate": 0.0, "max_helpfulness_drop": 0.5},
        **params,
    }
    deploy = {"resources": {}, "retries": 0, "shard_parallelism": 1}
    path.write_text(yaml.safe_dump({"params": values, "deploy": deploy}))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("iterated")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("CAI_CACHE_DIR", str(folder / "cache"))
        patch.delenv("CAI_ARTIFACT_ROOT", raising=False)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with kept_servers():  # the three runs share their warm step servers
            yield {"dir": folder, "model": tiny_model_dir, "platform": local_platform(folder)}


def run(work: dict, name: str, **params) -> dict:
    config = iterated_config(work["dir"] / f"{name}.yaml", work["model"], **params)
    return run_local(load_run_config(config), work["dir"], work["platform"])


@pytest.fixture(scope="module")
def first_run(work):
    return run(work, "first")


@pytest.fixture(scope="module")
def second_run(work, first_run):
    return run(work, "second", iteration={"overrides": {"2": {"rl": {"learning_rate": 2.0e-5}}}})


@pytest.fixture(scope="module")
def gated_run(work, second_run):
    """Last, under model names of its own: it reuses the SL-CAI stages the runs before made."""
    return run(work, "gated", model_name_prefix="gated", promotion={"min_harmless_win_rate": 1.0})


def statuses(summary: dict) -> dict[str, str]:
    """"stage NAME (round K)" -> ran / reused, from the run's stage lines."""
    return {line.split(": ")[0].removeprefix("stage "): line.split(": ", 1)[1].split(" ")[0] for line in summary["stages"]}


def rl_versions(work: dict, prefix: str = "cai") -> list:
    return list_models(work["platform"].tracking_uri, f"{prefix}-harmless-rl-cai")


# -- two rounds --------------------------------------------------------------------------------------------


def test_every_round_trains_its_own_pm_and_policy(first_run):
    stages = statuses(first_run)
    for name in ("train_pm", "rl"):
        assert [stages.get(n) for n in (name, f"{name} (round 2)")] == ["ran", "ran"]


def test_each_rounds_policy_is_registered_with_its_round(first_run, work):
    assert [v.lineage.round for v in rl_versions(work)] == [1, 2]


# Every round's versions are registered in the candidates models, so the chain runs through them; a
# production version is a promoted copy that keeps its candidate's lineage.
def test_lineage_reads_as_a_chain_from_the_last_round_back_to_sl_cai(first_run, work):
    candidates = list_models(work["platform"].tracking_uri, candidates_name("cai-harmless-rl-cai"))
    chain = [f"{v.name}/{v.version}" for v in ancestors(work["platform"].tracking_uri, candidates[-1])]
    first = candidates[0]
    assert chain[0] == f"{first.name}/{first.version}"
    assert chain[1].startswith(candidates_name("cai-harmless-sl-cai") + "/")


def test_the_champions_lineage_is_its_candidates(first_run, work):
    champion = version_by_alias(work["platform"].tracking_uri, "cai-harmless-rl-cai", "champion")
    last = list_models(work["platform"].tracking_uri, candidates_name("cai-harmless-rl-cai"))[-1]
    assert champion.lineage.parent_version == last.lineage.parent_version != ""


def test_each_rounds_pm_continues_the_round_befores(first_run, work):
    pms = list_models(work["platform"].tracking_uri, candidates_name("cai-harmless-pm"))
    assert [v.lineage.parent_version for v in pms] == ["", f"{pms[0].name}/{pms[0].version}"]


def test_the_last_rounds_policy_is_champion(first_run, work):
    champion = version_by_alias(work["platform"].tracking_uri, "cai-harmless-rl-cai", "champion")
    assert champion.lineage.round == 2


def test_the_report_rates_every_round_on_one_elo_scale_with_intervals(first_run):
    report = ArtifactStore.open(first_run["run_root"]).read_text("report.html")
    assert "Elo by round" in report
    # An earlier round's policy is rl-cai-round-K; the last round's is RL-CAI itself.
    # The rounds table's rows: policy, then its round.
    assert '<td>rl-cai-round-1</td><td class="num">1</td>' in report
    assert '<td>rl-cai</td><td class="num">2</td>' in report
    assert report.count(" [") >= 3  # "1012 [988, 1040]": each rating with its interval


def test_the_report_shows_the_generated_prompts_and_the_filter_counts(first_run):
    report = ArtifactStore.open(first_run["run_root"]).read_text("report.html")
    assert "Generated prompts" in report and "dropped: not_held_out" in report


def test_generated_prompts_reach_training_and_never_the_evaluation(first_run, work):
    folder = ArtifactStore.open(first_run["run_root"])
    generated = folder.read_json("stages/select_prompts.json")["uri"]
    kept = {row.prompt for row in read_dataset(generated, GeneratedPrompt) if row.kept}
    traces = folder.read_json("stages/merge_traces.json")["uri"]
    trained = {row.prompt for row in read_dataset(traces, Trace)}
    params = load_run_config(work["dir"] / "first.yaml").params
    held_out = {row.prompt for kind in ("red_team", "helpful") for row in prompt_splits(params)[f"{kind}_eval"]}
    assert kept & trained and not kept & held_out


# -- only round 2's settings changed ---------------------------------------------------------------------


def test_rerunning_with_only_round_2_changed_reuses_round_1(second_run):
    stages = statuses(second_run)
    earlier = [name for name in stages if name.split(" (")[0] in ROUND_STAGES and "(round 2)" not in name]
    assert earlier and {stages[name] for name in earlier} == {"reused"}


def test_rerunning_with_only_round_2_changed_reruns_round_2s_rl(second_run):
    assert statuses(second_run)["rl (round 2)"] == "ran"


def test_a_reused_earlier_round_is_not_gated_again(second_run, work):
    champion = version_by_alias(work["platform"].tracking_uri, "cai-harmless-rl-cai", "champion")
    assert champion.lineage.round == 2


# -- a round that fails the gate ends the run -------------------------------------------------------------


def test_a_round_that_fails_the_gate_ends_the_run_before_the_next_round(gated_run):
    stages = statuses(gated_run)
    assert "rl" in stages and not any("(round 2)" in name for name in stages)


def test_a_failed_first_round_leaves_no_champion(gated_run, work):
    assert version_by_alias(work["platform"].tracking_uri, "gated-harmless-rl-cai", "champion") is None
