"""The run recipes in pipelines/configs/: each loads and compiles, the GPU recipes ask for the
resources their comments promise, and the two-node recipe's training steps make TrainJobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cai_lib.cli import app
from cai_lib.core.errors import CaiError
from cai_lib.core.stage_table import TRAINING_STAGES
from cai_lib.engines.trainjob import TRAINJOB_ENV, plan_of
from cai_lib.platform.run_config import load_run_config
from pipelines.cai_pipeline import compile_pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
GENERATION = ("critique_revise", "helpful_samples", "sample_pairs", "label", "answer_eval")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_every_recipe_compiles(recipe, tmp_path):
    config = load_run_config(recipe)
    out = tmp_path / "pipeline.yaml"

    compile_pipeline(str(out), config.params, config.deploy)
    pipeline_spec, _ = yaml.safe_load_all(out.read_text())

    run = pipeline_spec["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]
    assert {"resolve-run", "sft", "train-pm", "rl", "evaluate", "register"} <= set(
        pipeline_spec["components"][run]["dag"]["tasks"]
    )


def test_the_one_node_recipe_trains_on_a_whole_8_gpu_node_and_generates_on_single_gpus():
    config = load_run_config(CONFIGS / "llama-8b-one-node.yaml")
    resources = config.deploy.resources

    assert {
        stage: (resources[stage].accelerator_count, resources[stage].num_nodes) for stage in TRAINING_STAGES
    } == {
        "sft": (8, 1),
        "train_pm": (8, 1),
        "rl": (8, 1),
    }
    assert {resources[stage].accelerator_count for stage in GENERATION} == {1}
    assert (config.params.sft.sharding, config.params.sft.precision) == ("fsdp", "bf16")
    assert (config.params.num_red_team, config.params.critique_revise.rounds) == (182831, 4)


def test_the_two_node_recipe_builds_on_the_one_node_recipe_and_adds_nodes():
    one, two = (load_run_config(CONFIGS / f"llama-8b-{name}.yaml") for name in ("one-node", "two-nodes"))

    assert two.params == one.params
    assert {stage: two.deploy.resources[stage].num_nodes for stage in TRAINING_STAGES} == dict.fromkeys(
        TRAINING_STAGES, 2
    )
    assert all(plan_of(stage, two.deploy) is not None for stage in TRAINING_STAGES)


def test_the_two_node_recipe_compiles_a_trainjob_plan_into_each_training_step(tmp_path):
    config = load_run_config(CONFIGS / "llama-8b-two-nodes.yaml")
    out = tmp_path / "pipeline.yaml"
    compile_pipeline(str(out), config.params, config.deploy)
    executors = next(yaml.safe_load_all(out.read_text()))["deploymentSpec"]["executors"]

    planned = {
        name for name, executor in executors.items()
        if any(env["name"] == TRAINJOB_ENV for env in executor["container"].get("env", []))
    }  # fmt: skip
    assert planned == {"exec-sft", "exec-train-pm", "exec-rl"}


def test_trainjob_render_prints_the_two_node_trainjob_the_sdk_accepts():
    from kubeflow_trainer_api import models

    result = CliRunner().invoke(
        app, ["trainjob", "render", "--stage", "sft", "--config", str(CONFIGS / "llama-8b-two-nodes.yaml")]
    )
    manifest = yaml.safe_load(result.output)
    trainer = manifest["spec"]["trainer"]

    assert result.exit_code == 0, result.output
    assert (trainer["numNodes"], trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]) == (2, "8")
    assert manifest["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert "AWS_SECRET_ACCESS_KEY" in yaml.safe_dump(manifest["spec"]["runtimePatches"])
    assert models.TrainerV1alpha1TrainJob.from_dict(manifest).spec.trainer.num_nodes == 2


def test_trainjob_render_of_a_single_node_stage_says_there_is_none():
    result = CliRunner().invoke(app, ["trainjob", "render", "--stage", "rl", "--set", "judge_model=Qwen/Qwen2.5-7B-Instruct"])

    assert "its resource profile has num_nodes 1" in str(result.exception)


def test_a_recipe_naming_an_unknown_stage_fails_naming_it(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        f"base: {CONFIGS / 'llama-8b-one-node.yaml'}\ndeploy:\n  resources:\n    finetune: {{}}\n"
    )

    with pytest.raises(CaiError, match=r"bad.yaml: field 'deploy': .*resources.finetune: unknown stage"):
        load_run_config(recipe)


def test_a_recipe_naming_an_unknown_field_fails_naming_it(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"base: {CONFIGS / 'llama-8b-one-node.yaml'}\nparams:\n  sft:\n    fsdp_wrap: true\n")

    with pytest.raises(CaiError, match=r"bad.yaml: field 'params.sft.fsdp_wrap': unknown key"):
        load_run_config(recipe)


def test_a_recipe_whose_base_chain_loops_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")

    with pytest.raises(CaiError, match="a.yaml: its base chain comes back to itself"):
        load_run_config(tmp_path / "a.yaml")
