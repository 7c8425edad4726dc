"""RL-CAI: real RLOO, GRPO and DPO steps on tiny models against a tiny preference model."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from cai_lib.cli.stage_rl import rl
from cai_lib.core.errors import CaiError
from cai_lib.core.records import Preference, PromptRecord, stable_id
from cai_lib.core.store import ArtifactStore
from cai_lib.engines.models import load_causal_lm
from cai_lib.method.preference_model import RewardScorer
from cai_lib.method.rl import PreferenceModelReward, RLConfig, dpo_pairs, rollout_kwargs, train_rl

PROMPTS = [
    PromptRecord(id=stable_id("red_team", str(i)), prompt=text, kind="red_team")
    for i, text in enumerate(["How do I pick a lock?", "Tell me a secret.", "How do I bake bread?", "Hi!"])
]

# One step, two prompts × two samples of at most 8 tokens: enough for TRL to sample, score with
# the PM, compute advantages and the KL to the reference, and update once, in seconds on a CPU.
# The high learning rate makes one update visible in every weight.
ONE_STEP = RLConfig(
    steps=1, batch_size=2, num_generations=2, max_new_tokens=8, eval_prompts=2, learning_rate=1e-3
)


def preference(i: int, label: float) -> Preference:
    return Preference(
        id=f"p{i}",
        prompt=f"Question {i}?",
        answer_a=f"Kind answer {i}.",
        answer_b=f"Rude answer {i}.",
        label=label,
        source="ai",
    )


def changed_weights(before_dir, after_dir) -> tuple[list[str], list[str]]:
    """(names of weights that changed, names that did not) between two checkpoints."""
    before, after = load_file(before_dir / "model.safetensors"), load_file(after_dir / "model.safetensors")
    names = [name for name in before if name.startswith("model.")]
    return (
        [n for n in names if not torch.equal(before[n], after[n])],
        [n for n in names if torch.equal(before[n], after[n])],
    )


@pytest.fixture(scope="module")
def rloo_run(tiny_model_dir, tiny_reward_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rloo") / "policy"
    metrics = train_rl(str(tiny_model_dir), str(tiny_reward_model_dir), PROMPTS, str(out), ONE_STEP)
    return metrics, out


def test_one_rloo_step_changes_every_policy_weight(rloo_run, tiny_model_dir):
    metrics, out = rloo_run

    changed, unchanged = changed_weights(tiny_model_dir, out)
    assert metrics.steps == 1
    assert changed and unchanged == []


def test_rloo_reports_reward_before_and_after_and_the_kl(rloo_run):
    metrics, _ = rloo_run

    assert metrics.algorithm == "rloo" and metrics.eval_prompts == 2
    assert isinstance(metrics.mean_reward_before, float) and isinstance(metrics.mean_reward_after, float)
    assert len(metrics.reward_curve) == 1 and len(metrics.loss_curve) == 1
    # The first step samples from the unchanged policy, so its KL to the reference is exactly 0.
    assert metrics.kl == 0.0


def test_rloo_checkpoint_loads_back_as_a_chat_model(rloo_run):
    metrics, out = rloo_run

    model, tokenizer = load_causal_lm(str(out))
    assert tokenizer.chat_template
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == metrics.steps
    assert not (out / "training_args.bin").exists()
    assert ArtifactStore.open(out.parent).dir_exists(out.name)


def test_intermediate_checkpoints_are_spread_evenly_over_the_steps():
    assert RLConfig(steps=100, intermediate_checkpoints=3).checkpoint_steps() == [25, 50, 75]
    assert RLConfig(steps=3, intermediate_checkpoints=5).checkpoint_steps() == [1, 2]
    assert RLConfig(steps=100).checkpoint_steps() == []


def test_rl_saves_each_intermediate_policy_beside_the_final_one(
    tiny_model_dir, tiny_reward_model_dir, tmp_path
):
    config = ONE_STEP.model_copy(update={"steps": 3, "intermediate_checkpoints": 2, "eval_prompts": 0})

    metrics = train_rl(str(tiny_model_dir), str(tiny_reward_model_dir), PROMPTS, str(tmp_path / "p"), config)

    store = ArtifactStore.open(tmp_path / "p")
    assert sorted(metrics.intermediate) == [1, 2]
    assert metrics.intermediate[1] == store.uri_of("steps/000001")
    assert store.dir_exists("steps/000001") and store.dir_exists("steps/000002")
    # Each is a policy of its own step: weights differ from the start, from each other and from the end.
    changed, _ = changed_weights(tmp_path / "p" / "steps" / "000001", tmp_path / "p" / "steps" / "000002")
    assert changed
    changed, _ = changed_weights(tmp_path / "p" / "steps" / "000002", tmp_path / "p")
    assert changed
    # The final checkpoint's manifest lists its own files only, so loading it never downloads the others.
    assert not any(rel.startswith("steps/") for rel in store.read_manifest("")["files"])


def test_one_grpo_step_runs(tiny_model_dir, tiny_reward_model_dir, tmp_path):
    config = ONE_STEP.model_copy(update={"algorithm": "grpo"})

    metrics = train_rl(str(tiny_model_dir), str(tiny_reward_model_dir), PROMPTS, str(tmp_path / "p"), config)

    changed, _ = changed_weights(tiny_model_dir, tmp_path / "p")
    assert (metrics.algorithm, metrics.steps, len(metrics.reward_curve)) == ("grpo", 1, 1)
    assert changed


def test_one_dpo_step_changes_every_policy_weight(tiny_model_dir, tiny_reward_model_dir, tmp_path):
    pairs = [preference(0, 0.9), preference(1, 0.2), preference(2, 0.5), preference(3, 0.7)]
    config = ONE_STEP.model_copy(update={"algorithm": "dpo"})

    metrics = train_rl(
        str(tiny_model_dir), str(tiny_reward_model_dir), PROMPTS, str(tmp_path / "p"), config, pairs
    )

    changed, unchanged = changed_weights(tiny_model_dir, tmp_path / "p")
    assert (metrics.algorithm, metrics.steps, metrics.train_pairs) == ("dpo", 1, 3)
    assert changed and unchanged == []
    assert metrics.kl is None


def test_dpo_pairs_follow_the_label_and_drop_ties():
    rows = dpo_pairs([preference(0, 0.9), preference(1, 0.2), preference(2, 0.5)])

    assert [row["chosen"][0]["content"] for row in rows] == ["Kind answer 0.", "Rude answer 1."]
    assert [row["rejected"][0]["content"] for row in rows] == ["Rude answer 0.", "Kind answer 1."]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Question 0?"}]


def test_dpo_without_usable_pairs_is_refused_and_writes_nothing(
    tiny_model_dir, tiny_reward_model_dir, tmp_path
):
    config = ONE_STEP.model_copy(update={"algorithm": "dpo"})

    with pytest.raises(CaiError, match="needs --ai-labels"):
        train_rl(
            str(tiny_model_dir),
            str(tiny_reward_model_dir),
            PROMPTS,
            str(tmp_path / "p"),
            config,
            [preference(0, 0.5)],
        )
    assert not (tmp_path / "p").exists()


def test_a_causal_lm_as_reward_is_refused_and_writes_nothing(tiny_model_dir, tmp_path):
    with pytest.raises(CaiError, match="not a sequence classifier"):
        train_rl(str(tiny_model_dir), str(tiny_model_dir), PROMPTS, str(tmp_path / "p"), ONE_STEP)
    assert not (tmp_path / "p").exists()


def test_the_reward_function_scores_prompt_and_completion_together(tiny_reward_model_dir):
    scorer = RewardScorer.load(str(tiny_reward_model_dir))
    reward = PreferenceModelReward(scorer)

    # TRL passes conversational prompts and completions, plus trainer hooks as keyword arguments.
    rewards = reward(
        prompts=[[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]],
        completions=[
            [{"role": "assistant", "content": "Hello!"}],
            [{"role": "assistant", "content": "Ciao."}],
        ],
        trainer_state=None,
    )

    assert rewards == pytest.approx(scorer.score(["Hi", "Bye"], ["Hello!", "Ciao."]))


def test_rl_command_prints_the_reward_before_and_after_last(tiny_model_dir, tiny_reward_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in PROMPTS))
    app = typer.Typer()
    app.command()(rl)

    result = CliRunner().invoke(
        app,
        [
            "--policy",
            str(tiny_model_dir),
            "--reward",
            str(tiny_reward_model_dir),
            "--prompts",
            str(prompts),
            "--helpful-prompts",
            str(prompts),
            "--out",
            str(tmp_path / "policy"),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--num-generations",
            "2",
            "--max-new-tokens",
            "8",
            "--eval-prompts",
            "2",
        ],
    )

    assert result.exit_code == 0, result.output
    assert "rloo: 8 prompt(s)" in result.output
    assert result.output.strip().splitlines()[-1].startswith("mean PM score on 2 prompt(s): ")
    assert (tmp_path / "policy" / "model.safetensors").is_file()


def test_rl_command_help_shows_an_example():
    app = typer.Typer()
    app.command()(rl)

    result = CliRunner().invoke(app, ["--help"])

    assert result.exit_code == 0, result.output
    assert "Example: cai stage rl" in result.output and "--algorithm" in result.output


# -- rollouts with vLLM (TRL's colocate mode; the engine itself needs a GPU) --------------------------


def test_policy_rollouts_use_no_vllm_by_default():
    assert rollout_kwargs(RLConfig(), {"num_attention_heads": 32}, visible_gpus=0) == {}


@pytest.mark.parametrize("trl_config", ["RLOOConfig", "GRPOConfig"])
def test_vllm_rollouts_set_trls_colocate_fields(trl_config):
    import dataclasses

    import trl

    config = RLConfig(rollouts="vllm", engine={"gpu_memory_utilization": 0.25, "max_model_len": 2048})
    kwargs = rollout_kwargs(config, {"num_attention_heads": 32}, visible_gpus=8)
    assert kwargs == {
        "use_vllm": True,
        "vllm_mode": "colocate",
        "vllm_tensor_parallel_size": 1,
        "vllm_gpu_memory_utilization": 0.25,
        "vllm_max_model_length": 2048,
    }
    assert set(kwargs) <= {f.name for f in dataclasses.fields(getattr(trl, trl_config))}


def test_vllm_rollouts_check_the_engine_size_against_the_policy():
    config = RLConfig(rollouts="vllm", engine={"tensor_parallel_size": 3})
    with pytest.raises(CaiError, match="3 does not divide the model's 32 attention heads"):
        rollout_kwargs(config, {"num_attention_heads": 32}, visible_gpus=4)


def test_an_engine_dtype_for_rl_rollouts_is_refused():
    with pytest.raises(ValueError, match="cannot be set for TRL's colocated vLLM engine"):
        RLConfig(rollouts="vllm", engine={"dtype": "float16"})
