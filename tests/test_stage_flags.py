"""The generation stages' command-line flags are built from their config models, as the training
stages' are: every field a flag (vLLM's engine sizing under --engine-*), a bad value named by its flag."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cai_lib.cli import app

GENERATION_COMMANDS = [
    "generate_prompts",
    "critique_revise",
    "helpful_samples",
    "sample_pairs",
    "label",
    "label_accuracy",
    "evaluate",
]


@pytest.mark.parametrize("command", GENERATION_COMMANDS)
def test_every_generation_command_sizes_the_vllm_engine_from_flags(command):
    result = CliRunner().invoke(app, ["stage", command, "--help"], env={"COLUMNS": "250"})

    assert result.exit_code == 0, result.output
    for flag in ("--backend", "--engine-tensor-parallel-size", "--engine-max-model-len", "--engine-enforce-eager"):
        assert flag in result.output, (command, flag)


def test_a_bad_engine_setting_is_named_by_its_flag_before_any_model_loads(tmp_path):
    result = CliRunner().invoke(
        app,
        ["stage", "critique_revise", "--prompts", "builtin:red_team", "--constitution", "harmless",
         "--policy", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"),
         "--engine-gpu-memory-utilization", "1.5"],
    )  # fmt: skip

    assert result.exit_code != 0
    assert "--engine-gpu-memory-utilization" in str(result.exception)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--principles", "--principles-per-pair"])
def test_the_principles_per_pair_flag_keeps_its_short_name(tmp_path, flag):
    result = CliRunner().invoke(
        app,
        ["stage", "label", "--pairs", str(tmp_path), "--constitution", "harmless", "--feedback-model", "m",
         "--out", str(tmp_path / "labels"), flag, "0"],
    )  # fmt: skip

    assert result.exit_code != 0
    assert "--principles-per-pair" in str(result.exception)
