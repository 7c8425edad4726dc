"""Training under torchrun with 2 CPU processes (gloo), on tiny models: the path an 8-GPU pod takes.

Each test starts a real `torchrun --standalone` through `cai_lib.engines.launch`, as `cai stage ...
--processes 2` and a multi-GPU pipeline step do. On a CPU accelerate runs DDP (its FSDP needs
accelerators), so these tests check the distributed data path, gradient averaging and rank-0
writing; the FSDP arguments an accelerator run gets are checked in test_training.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai_lib.cli import app
from cai_lib.core.names import MANIFEST
from cai_lib.core.records import Preference, PromptRecord, RevisionRound, Trace, stable_id
from cai_lib.engines.launch import TrainingJob, launch, staged_rows
from cai_lib.engines.models import load_causal_lm
from cai_lib.engines.training import _weights_sha256
from cai_lib.method.preference_model import PreferenceModelMetrics, RewardScorer
from cai_lib.method.rl import RLMetrics


def trace(i: int) -> Trace:
    answer = f"I won't help with that, but here is something safe, number {i}."
    return Trace(
        id=f"trace-{i}",
        prompt_id=f"prompt-{i}",
        prompt=f"How do I break into house number {i}?",
        initial_answer="Break a window.",
        rounds=[RevisionRound(principle_id="crime", critique="It helps with burglary.", revision=answer)],
        final_answer=answer,
        constitution_ref="harmless@1.0.0",
        constitution_sha256="ab" * 32,
        model_ref="tiny",
    )


def preference(i: int) -> Preference:
    return Preference(
        id=stable_id("ai", str(i)),
        prompt=f"What do you like? Ask {i}.",
        answer_a=f"I like apples, number {i}.",
        answer_b=f"I like stones, number {i}.",
        label=0.9,
        source="ai",
    )


def only_checkpoint_in(folder: Path) -> Path:
    """The one entry of `folder`, which must be a finished checkpoint."""
    entries = sorted(folder.iterdir())
    assert [entry.name for entry in entries] == ["out"]
    assert (entries[0] / MANIFEST).is_file()
    return entries[0]


def test_sft_with_two_processes_writes_one_checkpoint_that_generates(tiny_model_dir, tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    staged_rows(tmp_path, "traces", [trace(i) for i in range(8)])
    result = CliRunner().invoke(
        app,
        ["stage", "sft", "--traces", str(tmp_path / "traces.jsonl"), "--policy", str(tiny_model_dir),
         "--out", str(folder / "out"), "--processes", "2", "--batch-size", "2", "--max-steps", "2",
         "--learning-rate", "1e-2", "--max-length", "64"],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "world size 2 (ddp, bf16 false), effective batch 4, rows per rank [4, 4]" in result.output
    model, tokenizer = load_causal_lm(str(only_checkpoint_in(folder)))
    inputs = tokenizer("Hello", return_tensors="pt")
    assert (
        model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1]
        == inputs["input_ids"].shape[1] + 3
    )


def run_pm(tiny_model_dir, tmp_path) -> tuple[PreferenceModelMetrics, Path]:
    folder = tmp_path / "outputs"
    folder.mkdir()
    job = TrainingJob(
        stage="train_pm",
        model=str(tiny_model_dir),
        out=str(folder / "out"),
        data={"ai": staged_rows(tmp_path, "ai", [preference(i) for i in range(10)])},
        config={"batch_size": 2, "epochs": 1, "eval_fraction": 0.2, "max_length": 64, "processes": 2},
    )
    return PreferenceModelMetrics.model_validate(launch(job, 2)), folder


@pytest.fixture(scope="module")
def pm_run(tiny_model_dir, tmp_path_factory):
    return run_pm(tiny_model_dir, tmp_path_factory.mktemp("pm"))


def test_pm_ranks_end_with_identical_weights_that_rank_0_saved(pm_run):
    metrics, folder = pm_run
    digests = {rank.weights_sha256 for rank in metrics.world.ranks}
    saved = RewardScorer.load(str(only_checkpoint_in(folder)), device="cpu")

    assert [rank.rank for rank in metrics.world.ranks] == [0, 1]
    assert digests == {_weights_sha256(saved.model)}


def test_pm_ranks_train_on_different_rows(pm_run):
    metrics, _ = pm_run

    # 8 training pairs (2 of 10 held out), batches of 2 on each of 2 ranks: 2 steps of 4 pairs.
    assert [(rank.rows, rank.distinct_rows) for rank in metrics.world.ranks] == [(4, 4), (4, 4)]
    assert metrics.world.rows_on_several_ranks == 0
    assert metrics.world.effective_batch == 4


def test_pm_checkpoint_from_two_processes_scores(pm_run):
    _, folder = pm_run
    scorer = RewardScorer.load(str(only_checkpoint_in(folder)), device="cpu")

    scores = scorer.score(["What do you like?"] * 2, ["Apples.", "Stones."])
    assert len(scores) == 2 and scores[0] != scores[1]


def test_dpo_with_two_processes_trains_identical_ranks_and_saves_a_policy(
    tiny_model_dir, tiny_reward_model_dir, tmp_path
):
    folder = tmp_path / "outputs"
    folder.mkdir()
    job = TrainingJob(
        stage="rl",
        model=str(tiny_model_dir),
        reward=str(tiny_reward_model_dir),
        out=str(folder / "out"),
        data={
            "prompts": [],
            "preferences": staged_rows(tmp_path, "pairs", [preference(i) for i in range(4)]),
        },
        config={"algorithm": "dpo", "steps": 1, "batch_size": 2, "max_length": 64, "eval_prompts": 0},
    )
    metrics = RLMetrics.model_validate(launch(job, 2))
    model, _ = load_causal_lm(str(only_checkpoint_in(folder)))

    assert metrics.steps == 1 and metrics.world.world_size == 2
    assert {rank.weights_sha256 for rank in metrics.world.ranks} == {_weights_sha256(model)}
    assert [rank.rows for rank in metrics.world.ranks] == [2, 2] and metrics.world.rows_on_several_ranks == 0


def test_one_rloo_step_runs_under_two_processes(tiny_model_dir, tiny_reward_model_dir, tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    prompts = [
        PromptRecord(id=f"p{i}", prompt=f"Tell me about topic {i}.", kind="red_team") for i in range(4)
    ]
    job = TrainingJob(
        stage="rl",
        model=str(tiny_model_dir),
        reward=str(tiny_reward_model_dir),
        out=str(folder / "out"),
        data={"prompts": staged_rows(tmp_path, "prompts", prompts)},
        config={"steps": 1, "batch_size": 1, "num_generations": 2, "max_new_tokens": 4, "eval_prompts": 1},
    )
    metrics = RLMetrics.model_validate(launch(job, 2))

    assert metrics.steps == 1 and metrics.world.world_size == 2
    assert len({rank.weights_sha256 for rank in metrics.world.ranks}) == 1
    assert metrics.mean_reward_before is not None and metrics.mean_reward_after is not None
    only_checkpoint_in(folder)
