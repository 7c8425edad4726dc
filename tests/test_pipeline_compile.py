"""The compiled pipeline: parameters mirror the run config, GPU stages (and only they) carry
accelerators, node selectors and tolerations, secrets and the installation's settings arrive as
env, generation fans out, an exit handler closes the run, and KFP's cache is off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai_lib.core.config import PLATFORM_ENV
from cai_lib.core.deploy import DeployConfig
from cai_lib.core.errors import CaiError
from cai_lib.core.stage_table import GPU_STAGES, STAGES
from cai_lib.platform.run_config import PipelineParams, load_run_config
from pipelines.cai_pipeline import compile_pipeline

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "pipelines" / "cai_pipeline.yaml"
# Component names in the IR -> the stage they run, from the stage table.
STAGE_OF = {f"comp-{stage.component.replace('_', '-')}": stage.name for stage in STAGES}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, dict]:
    path = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    compile_pipeline(str(path))
    pipeline_spec, platform_spec = yaml.safe_load_all(path.read_text())
    return pipeline_spec, platform_spec


def executor_of(spec: dict, component: str) -> dict:
    label = spec["components"][component]["executorLabel"]
    return spec["deploymentSpec"]["executors"][label]


def all_tasks(spec: dict) -> dict:
    tasks = {**spec["root"]["dag"]["tasks"]}
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_every_run_config_field_is_a_pipeline_parameter_with_its_default(compiled):
    spec, _ = compiled
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == set(PipelineParams.model_fields)
    assert parameters["constitution"]["defaultValue"] == "harmless"
    assert parameters["critique_revise"]["parameterType"] == "STRUCT"
    assert parameters["critique_revise"]["defaultValue"]["rounds"] == 4


def test_gpu_stages_and_only_they_request_accelerators(compiled):
    spec, _ = compiled
    for component, stage in STAGE_OF.items():
        resources = executor_of(spec, component)["container"].get("resources", {})
        if stage in GPU_STAGES:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", component
            assert resources["accelerator"]["resourceCount"] == "1", component
        else:
            assert "accelerator" not in resources, component


def test_gpu_stages_and_only_they_get_node_selector_and_toleration(compiled):
    _, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    spec, _ = compiled
    for component, stage in STAGE_OF.items():
        config = executors[spec["components"][component]["executorLabel"]]
        if stage in GPU_STAGES:
            assert config["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}, component
            assert config["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ]
        else:
            assert "nodeSelector" not in config and "tolerations" not in config, component


def test_gpu_stages_and_only_they_mount_a_memory_backed_dev_shm_of_the_profiles_size(compiled):
    # NCCL and data loaders share memory through /dev/shm; a container's own is 64 MiB.
    spec, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for component, stage in STAGE_OF.items():
        mounts = executors[spec["components"][component]["executorLabel"]].get("emptyDirMounts", [])
        expected = [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "16Gi"}]
        assert mounts == (expected if stage in GPU_STAGES else []), component


def test_every_step_gets_s3_and_mlflow_credentials_from_secrets_not_parameters(compiled):
    spec, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for component in STAGE_OF:
        secrets = executors[spec["components"][component]["executorLabel"]]["secretAsEnv"]
        optional = {s["secretName"]: s.get("optional", False) for s in secrets}
        # the Hugging Face token only for gated or private models: optional, as MLflow's credentials;
        # the promoter's only where a model is promoted
        promoter = {"cai-mlflow-promoter": True} if component.startswith("comp-register") else {}
        assert optional == {"cai-s3": False, "cai-mlflow": True, "cai-hf": True} | promoter, component
        env = {k["envVar"] for s in secrets for k in s["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"} <= env
    assert not any("SECRET" in p.upper() for p in spec["root"]["inputDefinitions"]["parameters"])


def test_only_the_register_step_and_the_exit_handler_get_the_promoters_credentials(compiled):
    spec, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    with_promoter = {
        label
        for label, executor in executors.items()
        if any(s["secretName"] == "cai-mlflow-promoter" for s in executor.get("secretAsEnv", []))
    }
    assert with_promoter == {"exec-register", "exec-finish-run"}
    (promoter,) = [s for s in executors["exec-register"]["secretAsEnv"] if s["secretName"] == "cai-mlflow-promoter"]
    assert {k["envVar"] for k in promoter["keyToEnv"]} == {
        "CAI_PROMOTER_TRACKING_USERNAME",
        "CAI_PROMOTER_TRACKING_PASSWORD",
    }


def test_every_generation_stage_fans_out_in_a_parallel_for_and_is_merged(compiled):
    spec, _ = compiled
    tasks = all_tasks(spec)
    loops = [t for t in tasks.values() if "parameterIterator" in t]
    bodies = [sorted(spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]) for loop in loops]
    assert sorted(bodies) == [
        ["answer-eval-shard"],
        ["critique-revise-shard", "helpful-samples-shard"],
        ["generate-prompts-shard"],
        ["label-shard", "sample-pairs-shard"],
    ]
    merges = {
        name: task["inputs"]["parameters"]["name"]["runtimeValue"]["constant"]
        for name, task in tasks.items()
        if task["componentRef"]["name"].startswith("comp-merge-shards")
    }
    assert sorted(merges.values()) == ["answers", "candidates", "helpful", "labels", "traces"]


def test_evaluation_fans_out_over_its_own_work_items_and_training_stages_over_theirs(compiled):
    spec, _ = compiled
    iterated = {
        min(spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]): loop["parameterIterator"]["items"][
            "inputParameter"
        ]
        for loop in all_tasks(spec).values()
        if "parameterIterator" in loop
    }
    assert iterated == {
        "answer-eval-shard": "pipelinechannel--plan-eval-shards-Output",
        "generate-prompts-shard": "pipelinechannel--prepare-prompts-Output",
        "critique-revise-shard": "pipelinechannel--select-prompts-Output",
        "label-shard": "pipelinechannel--select-prompts-Output",
    }


def test_the_training_stages_read_the_prompts_mixed_with_the_generated_ones(compiled):
    spec, _ = compiled
    tasks = all_tasks(spec)
    assert tasks["select-prompts"]["inputs"]["artifacts"]["candidates"]["taskOutputArtifact"]["producerTask"] == (
        "merge-shards"
    )
    for task, name in (("critique-revise-shard", "prompts"), ("sample-pairs-shard", "prompts")):
        assert tasks[task]["inputs"]["artifacts"][name] == {
            "componentInputArtifact": "pipelinechannel--select-prompts-red_team_train"
        }
    assert tasks["rl"]["inputs"]["artifacts"]["helpful"]["taskOutputArtifact"] == {
        "outputArtifactKey": "helpful_train",
        "producerTask": "select-prompts",
    }


def test_nothing_generated_is_evaluated_on(compiled):
    spec, _ = compiled
    red_team = all_tasks(spec)["evaluate"]["inputs"]["artifacts"]["red_team"]["taskOutputArtifact"]
    assert red_team == {"outputArtifactKey": "red_team_eval", "producerTask": "prepare-prompts"}


# -- iterated CAI: rounds unrolled at compile time ------------------------------------------------------


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("ir2") / "pipeline.yaml"
    compile_pipeline(str(path), load_run_config(overrides=["rounds=2"]).params)
    return next(yaml.safe_load_all(path.read_text()))


def producer(artifact: dict) -> tuple[str, str]:
    """(task, output) an artifact input comes from, directly or through an enclosing loop or condition
    (whose inputs KFP names `pipelinechannel--TASK-OUTPUT`)."""
    if "taskOutputArtifact" in artifact:
        return artifact["taskOutputArtifact"]["producerTask"], artifact["taskOutputArtifact"]["outputArtifactKey"]
    channel = artifact["componentInputArtifact"].removeprefix("pipelinechannel--")
    task, _, output = channel.rpartition("-")
    return task, output


def test_two_rounds_chain_two_preference_models_and_two_rl_stages(two_rounds):
    tasks = all_tasks(two_rounds)
    chained = {name for name in tasks if name.startswith(("train-pm", "rl")) and "reference" not in name}
    assert chained == {"train-pm", "train-pm-2", "rl", "rl-2"}
    assert producer(tasks["rl-2"]["inputs"]["artifacts"]["policy"]) == ("rl", "rl_policy")
    assert producer(tasks["rl-2"]["inputs"]["artifacts"]["reward_model"]) == ("train-pm-2", "reward_model")
    assert producer(tasks["train-pm-2"]["inputs"]["artifacts"]["previous_pm"]) == ("train-pm", "reward_model")


def test_the_second_rounds_pairs_are_sampled_from_the_first_rounds_policy(two_rounds):
    tasks = all_tasks(two_rounds)
    assert producer(tasks["sample-pairs-shard"]["inputs"]["artifacts"]["policy"]) == ("sft", "policy")
    assert producer(tasks["sample-pairs-shard-2"]["inputs"]["artifacts"]["policy"]) == ("rl", "rl_policy")
    assert producer(tasks["label-shard-2"]["inputs"]["artifacts"]["pairs"]) == ("sample-pairs-shard-2", "pairs")
    assert tasks["rl-2"]["inputs"]["parameters"]["round"]["runtimeValue"]["constant"] == 2


def test_the_second_round_runs_only_if_the_first_rounds_policy_was_promoted(two_rounds):
    tasks = all_tasks(two_rounds)
    condition = next(task for task in tasks.values() if "condition" in task.get("triggerPolicy", {}))
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--register-Output'] == true"
    )
    body = two_rounds["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert {"train-pm-2", "rl-2", "register-2"} <= set(body)


def test_the_run_is_compared_once_in_its_last_round_after_evaluation_and_before_registration(two_rounds):
    tasks = all_tasks(two_rounds)
    assert [name for name in tasks if name.startswith("compare-runs")] == ["compare-runs"]
    condition = next(task for task in tasks.values() if "condition" in task.get("triggerPolicy", {}))
    assert "compare-runs" in two_rounds["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    compare = tasks["compare-runs"]
    assert "evaluate-2" in compare["dependentTasks"]
    assert compare["inputs"]["parameters"]["round"]["runtimeValue"]["constant"] == 2
    assert producer(tasks["register-2"]["inputs"]["artifacts"]["comparison"]) == ("compare-runs", "comparison")
    assert "comparison" not in tasks["register"]["inputs"]["artifacts"]


def test_the_comparison_is_a_kfp_html_visualisation(compiled):
    spec, _ = compiled
    outputs = spec["components"]["comp-compare-runs"]["outputDefinitions"]["artifacts"]
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"


def test_the_pipeline_is_told_how_many_rounds_it_was_compiled_with(two_rounds):
    resolve = all_tasks(two_rounds)["resolve-run"]
    assert resolve["inputs"]["parameters"]["compiled_rounds"]["runtimeValue"]["constant"] == 2


def test_labelling_of_a_shard_reads_the_pairs_of_the_same_shard(compiled):
    spec, _ = compiled
    pairs = all_tasks(spec)["label-shard"]["inputs"]["artifacts"]["pairs"]["taskOutputArtifact"]
    assert pairs == {"outputArtifactKey": "pairs", "producerTask": "sample-pairs-shard"}


def test_every_stage_is_retried_since_a_retry_resumes_or_reuses(compiled):
    spec, _ = compiled
    tasks = all_tasks(spec)
    for stage in STAGES:
        assert tasks[stage.component.replace("_", "-")]["retryPolicy"]["maxRetryCount"] == 2, stage.name


def test_kfp_caching_is_off_for_every_task(compiled):
    # Stages reuse content-addressed outputs themselves; KFP's cache would key on per-run values.
    spec, _ = compiled
    assert all(task.get("cachingOptions", {}) == {} for task in all_tasks(spec).values())


def test_an_exit_handler_finishes_the_run_whatever_the_stages_did(compiled):
    spec, _ = compiled
    finish = spec["root"]["dag"]["tasks"]["finish-run"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finish["dependentTasks"] == ["exit-handler-1"]


def test_every_step_reads_the_installations_settings_from_its_configmap(compiled):
    spec, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for component in [*STAGE_OF, "comp-finish-run"]:
        maps = executors[spec["components"][component]["executorLabel"]]["configMapAsEnv"]
        assert {k["envVar"] for m in maps for k in m["keyToEnv"]} == set(PLATFORM_ENV), component


def test_artifact_root_and_tracking_uri_are_not_pipeline_parameters(compiled):
    spec, _ = compiled
    assert not {"artifact_root", "mlflow_tracking_uri"} & set(spec["root"]["inputDefinitions"]["parameters"])


def test_the_pipeline_docs_list_each_stage_sections_fields_with_their_limits(compiled):
    spec, _ = compiled
    doc = spec["root"]["inputDefinitions"]["parameters"]["critique_revise"]["description"]
    assert "rounds (int, >= 1, default 4)" in doc


def test_gpu_stages_run_in_the_gpu_image_and_cpu_stages_in_the_cpu_image(tmp_path):
    deploy = DeployConfig(image_cpu="registry.example/cai:1", image_gpu="registry.example/cai-gpu:1")
    path = compile_pipeline(str(tmp_path / "p.yaml"), deploy=deploy)
    spec = next(yaml.safe_load_all(Path(path).read_text()))
    for component, stage in STAGE_OF.items():
        image = executor_of(spec, component)["container"]["image"]
        assert image == ("registry.example/cai-gpu:1" if stage in GPU_STAGES else "registry.example/cai:1")


def test_committed_pipeline_yaml_is_up_to_date(tmp_path):
    fresh = Path(compile_pipeline(str(tmp_path / "p.yaml"))).read_bytes()
    assert COMMITTED.read_bytes() == fresh, "pipelines/cai_pipeline.yaml is stale: run `make compile`"


def test_committed_impact_pipeline_yaml_is_up_to_date(tmp_path):
    from pipelines.impact_pipeline import compile_impact_pipeline

    fresh = Path(compile_impact_pipeline(str(tmp_path / "impact.yaml"))).read_bytes()
    committed = COMMITTED.parent / "impact_pipeline.yaml"
    assert committed.read_bytes() == fresh, "pipelines/impact_pipeline.yaml is stale: run `make compile`"


def test_the_impact_pipeline_labels_on_the_label_stages_resources_with_the_installations_settings(tmp_path):
    from pipelines.impact_pipeline import compile_impact_pipeline

    deploy = load_run_config(overrides=[]).deploy
    path = compile_impact_pipeline(str(tmp_path / "impact.yaml"), deploy)
    spec, platform = yaml.safe_load_all(Path(path).read_text())
    executor = executor_of(spec, "comp-impact-preview")["container"]
    assert executor["image"] == deploy.image_gpu
    assert executor["resources"]["accelerator"]["resourceCount"] == str(deploy.resources["label"].accelerator_count)
    config_maps = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-impact-preview"]["configMapAsEnv"]
    assert config_maps[0]["configMapName"] == deploy.secrets.env_configmap
    outputs = spec["components"]["comp-impact-preview"]["outputDefinitions"]["artifacts"]
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"


def test_cai_compile_writes_the_same_bytes_in_every_process(tmp_path):
    # kfp orders a dict parameter's default in its header comment by a protobuf map, whose order
    # differs between processes: two `cai compile` runs, each in its own process, must still agree.
    outputs = [tmp_path / "first.yaml", tmp_path / "second.yaml"]
    for number, out in enumerate(outputs):
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": str(number)}
        subprocess.run(
            [sys.executable, "-c", "from cai_lib.cli import main; main()", "compile", "--out", str(out)],
            cwd=REPO, env=env, check=True, capture_output=True,
        )  # fmt: skip

    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    assert outputs[0].read_bytes().startswith(b"# PIPELINE DEFINITION\n")


def test_unknown_config_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("params:\n  critique_revise:\n    roundz: 2\n")
    with pytest.raises(CaiError, match=r"run\.yaml: field 'params\.critique_revise\.roundz': unknown key"):
        load_run_config(path)


def test_a_gpu_on_a_cpu_stage_is_refused():
    with pytest.raises(
        CaiError, match=r"resources\.merge_labels: asks for a GPU but merge_labels is a CPU-only stage"
    ):
        load_run_config(
            overrides=[
                "deploy.resources={merge_labels: {accelerator_type: nvidia.com/gpu, accelerator_count: 1}}"
            ]
        )


def test_a_malformed_toleration_is_refused():
    bad = "deploy.resources={sft: {tolerations: [{key: gpu, operator: Equal}]}}"
    with pytest.raises(CaiError, match=r"toleration 'gpu': operator Equal needs a value"):
        load_run_config(overrides=[bad])


def test_set_overrides_reach_nested_sections_without_the_params_prefix():
    config = load_run_config(overrides=["critique_revise.rounds=2", "constitution=harmless@1.0.0"])
    assert config.params.critique_revise.rounds == 2
    assert config.params.constitution == "harmless@1.0.0"


def test_quick_config_is_valid():
    config = load_run_config(REPO / "pipelines" / "configs" / "quick.yaml")
    assert config.params.critique_revise.rounds == 2
    assert config.deploy.resources == {}


def strings(value) -> list[str]:
    """Every string inside a dumped config, at any depth."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return []


def test_the_quick_config_reads_nothing_from_the_hub_and_the_paper_recipe_reads_the_real_sets():
    quick = load_run_config(REPO / "pipelines" / "configs" / "quick.yaml")
    paper = load_run_config(REPO / "pipelines" / "configs" / "paper.yaml").params

    # The references' pair sources are read only for the references it trains: none in the demo.
    assert quick.params.references.policies == []
    read = quick.model_dump(mode="json")
    del read["params"]["references"]
    assert [s for s in strings(read) if s.startswith("hf:")] == []
    assert quick.params.validate_labels.sources == ["builtin:comparisons"]
    assert quick.params.evaluate.xstest.prompts == "builtin:refusal_contrast"
    assert paper.validate_labels.sources == ["hf:Anthropic/hh-rlhf/harmless-base:test"]
    assert paper.evaluate.xstest.prompts == "hf:walledai/XSTest"


def test_the_paper_recipe_is_valid_and_follows_the_paper():
    params = load_run_config(REPO / "pipelines" / "configs" / "paper.yaml").params
    assert (params.critique_revise.rounds, params.helpful_samples.samples_per_prompt) == (4, 2)
    assert (params.label.cot, params.label.clamp_cot, params.human_preference_kind) == (
        True,
        True,
        "helpfulness",
    )
    assert params.sft.include_intermediate_revisions
    ratios = (params.generate_prompts.red_team.generated_per_human, params.generate_prompts.helpful.generated_per_human)
    assert ratios == (pytest.approx(140_335 / 42_496, abs=0.01), pytest.approx(90_754 / 44_542, abs=0.01))


def test_the_quick_demo_generates_a_small_set_of_each_kind():
    generated = load_run_config(REPO / "pipelines" / "configs" / "quick.yaml").params.generate_prompts
    assert 0 < generated.red_team.candidates <= 8 and 0 < generated.helpful.candidates <= 8


def test_stage_seeds_derive_from_the_run_seed_unless_pinned():
    runs = [
        load_run_config(overrides=overrides).params
        for overrides in (["seed=1"], ["seed=2"], ["seed=2", "sft.seed=7"])
    ]
    assert runs[0].sft.seed != runs[1].sft.seed and runs[2].sft.seed == 7
    assert runs[1].rl.seed == runs[2].rl.seed


def test_a_derived_stage_seed_is_not_a_pipeline_parameter_default(compiled):
    spec, _ = compiled
    assert "seed" not in spec["root"]["inputDefinitions"]["parameters"]["sft"]["defaultValue"]


def test_evaluation_never_fans_out_to_a_shard_without_held_out_prompts():
    eight = load_run_config(overrides=["num_shards=8"]).params
    assert eight.eval_shard_count(red_team=5, helpful=2) == 5
    assert eight.eval_shard_count(red_team=40, helpful=60) == 8
    per_hundred = load_run_config(overrides=["rows_per_shard=100"]).params
    assert per_hundred.eval_shard_count(red_team=150, helpful=100) == 3
    # XSTest's prompts count as evaluation rows too.
    assert per_hundred.eval_shard_count(red_team=150, helpful=100, xstest=450) == 7
