"""The SL-CAI fine-tuning stage on a tiny random Llama (TRL's SFTTrainer on CPU).

The data is one (prompt, revision) trace repeated, so the model can overfit it: with a learning
rate of 1e-2 and 12 steps of 4 examples the loss of a random 2-layer model falls by about two
nats in seconds. Nothing here measures quality; it checks that training happens and that the
checkpoint is a plain causal LM that loads and generates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cai_lib.cli.stage_sl import sft_command
from cai_lib.core.errors import CaiError
from cai_lib.core.names import SFT_PROVENANCE_FILE
from cai_lib.core.records import RevisionRound, Trace
from cai_lib.core.store import ArtifactStore
from cai_lib.engines.generation import SamplingParams, load_backend
from cai_lib.method.sft import SFTStageConfig, helpful_examples, revision_examples, train_sft

PROMPT = "How do I pick the lock on my neighbour's door?"
FINAL = "I can't help you get into someone else's home, but a locksmith can help with your own door."


def red_team_trace(index: int = 0) -> Trace:
    return Trace(
        id=f"trace-{index}",
        prompt_id=f"prompt-{index}",
        prompt=PROMPT,
        initial_answer="Use a tension wrench and a pick.",
        rounds=[
            RevisionRound(principle_id="crime", critique="It helps with burglary.", revision="I won't help."),
            RevisionRound(principle_id="harmful-general", critique="Too curt.", revision=FINAL),
        ],
        final_answer=FINAL,
        constitution_ref="harmless@1.0.0",
        constitution_sha256="ab" * 32,
        model_ref="tiny",
    )


def helpful_trace(index: int) -> Trace:
    answer = f"Answer {index}."
    return Trace(
        id=f"h{index}",
        prompt_id=f"hp{index}",
        prompt=f"Question {index}?",
        kind="helpful",
        initial_answer=answer,
        final_answer=answer,
        model_ref="tiny",
    )


# Small on purpose: 12 steps of 4 sequences of ~70 tokens train a 2-layer width-32 model in seconds;
# a learning rate of 1e-2 lets such a model overfit one repeated example within those steps.
OVERFIT = {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "max_length": 128, "helpful_ratio": 0.0}


def state_dict_of(ref: str) -> dict:
    from cai_lib.engines.models import load_causal_lm

    model, _ = load_causal_lm(ref)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft") / "sl-cai")
    metrics = train_sft([red_team_trace()] * 8, [], str(tiny_model_dir), out, SFTStageConfig(**OVERFIT))
    return metrics, out


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft-lora") / "sl-cai")
    # LoRA trains a rank-4 update of the projections only, so it gets a higher rate.
    config = SFTStageConfig(**{**OVERFIT, "learning_rate": 3e-2}, lora=True, lora_r=4, lora_alpha=8)
    metrics = train_sft([red_team_trace()] * 8, [], str(tiny_model_dir), out, config)
    return metrics, out


# -- the training mix ---------------------------------------------------------------------------


def test_final_revisions_give_one_example_per_trace():
    examples = revision_examples([red_team_trace(0), red_team_trace(1)], include_intermediate=False)

    assert (
        examples
        == [
            {
                "prompt": [{"role": "user", "content": PROMPT}],
                "completion": [{"role": "assistant", "content": FINAL}],
            }
        ]
        * 2
    )


def test_intermediate_revisions_give_one_example_per_round():
    examples = revision_examples([red_team_trace()], include_intermediate=True)

    assert [e["completion"][0]["content"] for e in examples] == ["I won't help.", FINAL]


def test_helpful_ratio_is_helpful_samples_per_revision_example():
    helpful = [helpful_trace(i) for i in range(10)]

    assert len(helpful_examples(helpful, n_revision=8, ratio=0.5, seed=0)) == 4
    assert len(helpful_examples(helpful, n_revision=8, ratio=0.0, seed=0)) == 0
    assert len(helpful_examples(helpful, n_revision=8, ratio=3.0, seed=0)) == 10  # all there are, no repeats


def test_helpful_draw_is_fixed_by_the_seed():
    helpful = [helpful_trace(i) for i in range(10)]

    assert helpful_examples(helpful, 8, 0.5, seed=1) == helpful_examples(helpful, 8, 0.5, seed=1)
    assert helpful_examples(helpful, 8, 0.5, seed=1) != helpful_examples(helpful, 8, 0.5, seed=2)


# -- full fine-tuning ----------------------------------------------------------------------------


def test_full_fine_tuning_lowers_the_loss_on_a_repeated_example(full_run):
    metrics, _ = full_run

    assert metrics.steps == 12
    assert (metrics.examples, metrics.revision_examples, metrics.helpful_examples) == (8, 8, 0)
    assert metrics.train_loss_last < metrics.train_loss_first - 1.0


def test_full_fine_tuning_changes_every_weight(full_run, tiny_model_dir):
    _, out = full_run
    before, after = state_dict_of(str(tiny_model_dir)), state_dict_of(out)

    assert after.keys() == before.keys()
    unchanged = [name for name in before if before[name].equal(after[name])]
    assert unchanged == []


def test_the_checkpoint_generates(full_run):
    _, out = full_run
    backend = load_backend(out)

    replies = backend.generate([[{"role": "user", "content": PROMPT}]], SamplingParams(max_new_tokens=8))

    assert len(replies) == 1 and isinstance(replies[0], str)


def test_the_checkpoint_records_its_provenance(full_run, tiny_model_dir):
    metrics, out = full_run
    provenance = ArtifactStore.open(out).read_json(SFT_PROVENANCE_FILE)

    assert provenance["base_model_ref"] == str(tiny_model_dir)
    assert provenance["constitutions"] == [f"harmless@1.0.0 {'ab' * 32}"]
    assert provenance["metrics"] == metrics.model_dump()


# -- LoRA -----------------------------------------------------------------------------------------


def test_lora_lowers_the_loss(lora_run):
    metrics, _ = lora_run

    # Less than full fine-tuning: the random embeddings and output head stay frozen.
    assert metrics.train_loss_last < metrics.train_loss_first - 0.2


def test_lora_is_merged_into_a_plain_checkpoint(lora_run, tiny_model_dir):
    _, out = lora_run
    before, after = state_dict_of(str(tiny_model_dir)), state_dict_of(out)

    assert after.keys() == before.keys()  # no adapter tensors: a plain LlamaForCausalLM
    changed = {name for name in before if not before[name].equal(after[name])}
    # LoRA's all-linear targets are the attention and MLP projections, not embeddings or norms.
    assert changed == {name for name in before if name.endswith("proj.weight")}


# -- outputs and bad input ------------------------------------------------------------------------


def test_checkpoint_is_written_to_s3_and_loads_from_there(tiny_model_dir, s3_bucket):
    out = f"s3://{s3_bucket}/runs/sl-cai"

    train_sft([red_team_trace()], [helpful_trace(0)], str(tiny_model_dir), out, SFTStageConfig(max_steps=1))

    backend = load_backend(out)
    assert len(backend.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=4))) == 1


def test_a_given_chat_template_is_used_and_kept_in_the_checkpoint(tiny_model_dir, tmp_path):
    base = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, base)
    template = (base / "chat_template.jinja").read_text()
    (base / "chat_template.jinja").unlink()
    config = SFTStageConfig(max_steps=1, chat_template=template)

    train_sft([red_team_trace()], [], str(base), str(tmp_path / "o"), config)

    assert (tmp_path / "o" / "chat_template.jinja").read_text() == template


def test_a_finished_checkpoint_at_out_is_refused_before_training(full_run, tiny_model_dir):
    _, out = full_run
    manifest = (Path(out) / "_MANIFEST.json").read_text()

    with pytest.raises(CaiError, match="already holds a finished checkpoint"):
        train_sft([red_team_trace()], [], str(tiny_model_dir), out, SFTStageConfig())
    assert (Path(out) / "_MANIFEST.json").read_text() == manifest


def test_an_out_holding_other_files_is_refused_before_training(tiny_model_dir, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")

    with pytest.raises(CaiError, match="holds files but no finished checkpoint"):
        train_sft(
            [red_team_trace()], [], str(tiny_model_dir), str(tmp_path / "ckpt"), SFTStageConfig(max_steps=1)
        )
    assert (tmp_path / "ckpt" / "config.json").read_text() == "{}"


def test_helpfulness_samples_passed_as_traces_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(CaiError, match="trace h0: has no critique→revision rounds"):
        train_sft([helpful_trace(0)], [], str(tiny_model_dir), str(tmp_path / "o"), SFTStageConfig())
    assert not (tmp_path / "o").exists()


def test_empty_revisions_are_left_out(tiny_model_dir, tmp_path):
    empty = red_team_trace(1).model_copy(update={"final_answer": ""})

    metrics = train_sft(
        [red_team_trace(0), empty], [], str(tiny_model_dir), str(tmp_path / "o"), SFTStageConfig(max_steps=1)
    )

    assert (metrics.revision_examples, metrics.skipped_empty) == (1, 1)


def test_only_empty_revisions_is_an_error(tiny_model_dir, tmp_path):
    empty = red_team_trace().model_copy(update={"final_answer": ""})

    with pytest.raises(CaiError, match="every revision in the data is empty"):
        train_sft([empty], [], str(tiny_model_dir), str(tmp_path / "o"), SFTStageConfig())


def test_no_traces_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(CaiError, match="no SL-CAI traces"):
        train_sft([], [helpful_trace(0)], str(tiny_model_dir), str(tmp_path / "o"), SFTStageConfig())


# -- the command line -----------------------------------------------------------------------------


@pytest.fixture
def sft_app() -> typer.Typer:
    app = typer.Typer()
    app.command("sft")(sft_command)
    app.command("unused")(lambda: None)  # two commands, so typer keeps the subcommand name
    return app


def test_cli_sft_help_shows_an_example(sft_app):
    result = CliRunner().invoke(sft_app, ["sft", "--help"], terminal_width=200)

    assert result.exit_code == 0, result.output
    assert "Example: cai stage sft --traces" in result.output


def test_cli_sft_trains_on_a_traces_dataset(sft_app, tiny_model_dir, tmp_path):
    ArtifactStore.open(tmp_path).write_jsonl("traces.jsonl", [red_team_trace(0), red_team_trace(1)])
    ArtifactStore.open(tmp_path).write_jsonl("helpful.jsonl", [helpful_trace(0), helpful_trace(1)])

    result = CliRunner().invoke(
        sft_app,
        [
            "sft",
            "--traces",
            str(tmp_path / "traces.jsonl"),
            "--helpful-samples",
            str(tmp_path / "helpful.jsonl"),
            "--policy",
            str(tiny_model_dir),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "ckpt"),
        ],
    )

    assert result.exit_code == 0, result.output
    assert "trained 2 step(s) on 4 examples (2 revisions, 2 helpful)" in result.output
    assert ArtifactStore.open(tmp_path).dir_exists("ckpt")
