"""How a training stage uses its pod: process count, sharding, precision, and the flags built from
the config models. Pure functions; the runs under torchrun are in test_distributed.py."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cai_lib.cli import app
from cai_lib.cli.config_options import flags_of
from cai_lib.core.errors import CaiError
from cai_lib.engines.launch import TrainingJob, torchrun_command
from cai_lib.engines.training import TrainingSetup, World, process_count, trainer_arguments
from cai_lib.method.preference_model import PreferenceModelConfig
from cai_lib.method.rl import RLConfig
from cai_lib.method.sft import SFTStageConfig

EIGHT_RANKS = World(rank=3, local_rank=3, size=8)


def test_processes_default_to_one_per_visible_gpu():
    assert process_count(TrainingSetup(), gpus=8) == 8


def test_processes_default_to_one_on_a_cpu():
    assert process_count(TrainingSetup(), gpus=0) == 1


def test_a_cpu_runs_as_many_gloo_processes_as_asked():
    assert process_count(TrainingSetup(processes=2), gpus=0) == 2


def test_more_processes_than_gpus_is_refused():
    with pytest.raises(CaiError, match="processes 4: the pod sees 2 GPU"):
        process_count(TrainingSetup(processes=4), gpus=2)


def test_full_fine_tuning_on_gpus_shards_with_fsdp2_and_a_full_state_dict_for_saving():
    arguments = trainer_arguments(TrainingSetup(), EIGHT_RANKS, lora=False, on_gpu=True, bf16_supported=True)

    assert arguments["fsdp"] is True
    assert arguments["fsdp_config"]["version"] == 2
    assert arguments["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"


def test_lora_on_gpus_uses_ddp():
    arguments = trainer_arguments(TrainingSetup(), EIGHT_RANKS, lora=True, on_gpu=True, bf16_supported=True)

    assert "fsdp" not in arguments


def test_fsdp_with_lora_is_refused():
    with pytest.raises(CaiError, match="sharding fsdp with lora"):
        trainer_arguments(
            TrainingSetup(sharding="fsdp"), EIGHT_RANKS, lora=True, on_gpu=True, bf16_supported=True
        )


def test_cpu_processes_never_ask_for_fsdp_and_train_on_the_cpu():
    arguments = trainer_arguments(
        TrainingSetup(sharding="fsdp"), World(size=2), lora=False, on_gpu=False, bf16_supported=False
    )

    assert "fsdp" not in arguments and arguments["use_cpu"] is True


def test_a_gpu_with_bf16_trains_in_bf16_autocast_by_default():
    arguments = trainer_arguments(TrainingSetup(), World(), lora=False, on_gpu=True, bf16_supported=True)

    assert arguments["bf16"] is True and arguments["use_cpu"] is False


def test_fp32_precision_turns_autocast_off_on_a_gpu():
    arguments = trainer_arguments(
        TrainingSetup(precision="fp32"), World(), lora=False, on_gpu=True, bf16_supported=True
    )

    assert arguments["bf16"] is False


def test_bf16_on_a_cpu_is_refused():
    with pytest.raises(CaiError, match="precision bf16: needs a GPU"):
        trainer_arguments(
            TrainingSetup(precision="bf16"), World(), lora=False, on_gpu=False, bf16_supported=False
        )


def test_activation_checkpointing_is_fsdps_own_when_sharded():
    setup = TrainingSetup(activation_checkpointing=True)
    sharded = trainer_arguments(setup, EIGHT_RANKS, lora=False, on_gpu=True, bf16_supported=True)
    single = trainer_arguments(setup, World(), lora=False, on_gpu=True, bf16_supported=True)

    assert (
        sharded["gradient_checkpointing"] is False
        and sharded["fsdp_config"]["activation_checkpointing"] is True
    )
    assert single["gradient_checkpointing"] is True


def test_the_optimizer_is_passed_by_its_hugging_face_name():
    arguments = trainer_arguments(
        TrainingSetup(optimizer="adafactor"), World(), lora=False, on_gpu=False, bf16_supported=False
    )

    assert arguments["optim"] == "adafactor"


@pytest.mark.parametrize("config", [SFTStageConfig, PreferenceModelConfig, RLConfig])
def test_every_training_config_field_has_a_flag(config):
    flagged = {flag.path[0] for flag in flags_of(config)}

    assert flagged == set(config.model_fields)


def test_nested_engine_fields_get_flags_under_their_section():
    flags = {flag.flag for flag in flags_of(RLConfig)}

    assert {
        "--engine-gpu-memory-utilization",
        "--engine-max-model-len",
        "--processes",
        "--precision",
    } <= flags


def test_the_rl_command_sets_a_nested_field_and_a_bad_value_names_its_flag(tmp_path):
    result = CliRunner().invoke(
        app,
        ["stage", "rl", "--policy", "p", "--reward", "r", "--prompts", "builtin:red_team", "--out", str(tmp_path),
         "--engine-gpu-memory-utilization", "1.5"],
    )  # fmt: skip

    assert result.exit_code != 0
    assert "--engine-gpu-memory-utilization" in str(result.exception) + result.output


def test_an_sft_flag_that_is_out_of_range_names_the_flag(tmp_path):
    result = CliRunner().invoke(
        app,
        ["stage", "sft", "--traces", "d", "--policy", "m", "--out", str(tmp_path / "o"), "--processes", "-1"],
    )

    assert "--processes" in str(result.exception)


def test_a_job_missing_a_dataset_its_stage_reads_is_refused():
    job = TrainingJob(stage="sft", model="m", out="o", data={"helpful": ["h"]}, config={})

    with pytest.raises(CaiError, match=r"sft: datasets missing \['traces'\]"):
        job.checked()


def test_a_job_with_an_unknown_config_field_is_refused_naming_it():
    job = TrainingJob(stage="train_pm", model="m", out="o", data={"ai": ["a"]}, config={"lora_rank": 8})

    with pytest.raises(CaiError, match="train_pm config: field 'lora_rank': unknown key"):
        job.checked()


def test_local_processes_start_under_a_standalone_torchrun():
    command = torchrun_command(2, "/tmp/job.json")

    assert command[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "cai_lib.engines.launch", "/tmp/job.json"
    ]  # fmt: skip


def test_a_trainjob_node_runs_torchrun_configured_by_the_runtime():
    assert torchrun_command(None, "s3://b/job.json") == [
        "torchrun",
        "-m",
        "cai_lib.engines.launch",
        "s3://b/job.json",
    ]
