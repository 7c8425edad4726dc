"""The evaluation's judge is independent by construction: a run whose judge is the feedback model,
the base model or a policy it judges is refused when it is loaded, unless the config allows it
with a reason that the report shows; and on every shipped constitution and recipe, the judging
principles and their few-shot text never reach the prompts the training labels are made from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from evaluation_data import sample_result
from typer.testing import CliRunner

from cai_lib.core.constitution import load_constitution
from cai_lib.core.errors import CaiError
from cai_lib.method.evaluation.config import EvaluationConfig, judging_principles
from cai_lib.method.evaluation.report import judge_note, report_html
from cai_lib.method.feedback import labeller_examples, principle_pool
from cai_lib.platform.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "pipelines" / "configs").glob("*.yaml"))
CONSTITUTIONS = sorted((REPO / "constitutions").glob("*/*.yaml"))
QWEN = "Qwen/Qwen2.5-7B-Instruct"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
ALLOW = [
    "evaluate.allow_dependent_judge=true",
    "evaluate.dependent_judge_reason='one model for everything in a smoke test'",
]


def params(*overrides: str):
    return load_run_config(None, list(overrides)).params


# -- refused when loaded -----------------------------------------------------------------------------------


def test_a_judge_that_is_the_feedback_model_is_refused_naming_the_fields():
    run = params(f"base_model={LLAMA}", f"feedback_model={QWEN}", f"judge_model={QWEN}")
    with pytest.raises(CaiError, match=r"^params\.judge_model: .*judge_model is also feedback_model\)"):
        run.check_independent_judge()


def test_a_judge_that_is_the_base_model_is_refused():
    run = params(f"base_model={LLAMA}", f"feedback_model={QWEN}", f"judge_model={LLAMA}")
    with pytest.raises(CaiError, match=r"judge_model is also base_model"):
        run.check_independent_judge()


@pytest.mark.parametrize(
    "judge",
    ["HuggingFaceTB/SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135m-instruct@main"],
    ids=["hub-id-of-the-embedded-model", "other-case-and-revision"],
)
def test_another_spelling_of_the_same_model_is_the_same_model(judge):
    run = params(f"base_model={LLAMA}", "feedback_model=smollm2-135m-instruct", f"judge_model={judge}")
    with pytest.raises(CaiError, match=r"judge_model is also feedback_model"):
        run.check_independent_judge()


def test_two_paths_to_one_checkpoint_are_caught_by_the_pinned_content():
    run = params(f"base_model={LLAMA}", "feedback_model=/models/a", "judge_model=/models/b")
    run.check_independent_judge()  # the references differ ...
    with pytest.raises(CaiError, match=r"judge_model is the same checkpoint as feedback_model"):
        run.check_independent_judge({"/models/a": "sha-1", "/models/b": "sha-1", LLAMA: "sha-2"})


def test_a_judge_among_the_models_the_pipeline_registers_is_refused():
    run = params(f"base_model={LLAMA}", f"feedback_model={LLAMA}", "judge_model=models:/cai-harmless-rl-cai@champion")
    with pytest.raises(CaiError, match=r"a model this pipeline registers and evaluates"):
        run.check_independent_judge()


def test_judging_principles_that_also_label_make_the_judge_dependent():
    run = params(
        f"base_model={LLAMA}",
        f"feedback_model={LLAMA}",
        f"judge_model={QWEN}",
        "evaluate.hold_out_judge_principles=false",
    )
    with pytest.raises(CaiError, match=r"hold_out_judge_principles is off"):
        run.check_independent_judge()


def test_an_independent_judge_passes():
    params(f"base_model={LLAMA}", f"feedback_model={LLAMA}", f"judge_model={QWEN}").check_independent_judge()


def test_setting_the_feedback_model_alone_does_not_leave_the_judge_on_the_default():
    run = params(f"feedback_model={LLAMA}", *ALLOW)
    with pytest.raises(CaiError, match=r"^params\.judge_model: not given while feedback_model is"):
        run.check_independent_judge()


def test_a_dependent_judge_is_allowed_with_a_reason():
    params(*ALLOW).check_independent_judge()


def test_the_allowance_needs_a_reason():
    with pytest.raises(CaiError, match=r"field 'params\.evaluate': .*dependent_judge_reason is empty"):
        params("evaluate.allow_dependent_judge=true")


def test_cai_run_refuses_a_dependent_judge_before_anything_starts(tmp_path, monkeypatch):
    from cai_lib.cli import app

    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(app, ["run", "--set", f"judge_model={LLAMA}", "--set", f"base_model={LLAMA}"])
    assert isinstance(result.exception, CaiError)
    assert str(result.exception).startswith(f"params.judge_model: the judge {LLAMA} is not independent")
    assert list(tmp_path.iterdir()) == []


def test_the_quick_demo_allows_its_one_model_and_says_why():
    quick = load_run_config(REPO / "pipelines" / "configs" / "quick.yaml").params
    quick.check_independent_judge()
    assert quick.evaluate.allow_dependent_judge and "CPU demo" in quick.evaluate.dependent_judge_reason


def family(ref: str) -> str:
    """A hub model's family: its organisation, and its name up to the first digit or dash."""
    org, _, name = ref.partition("/")
    stem = re.split(r"[-\d]", name.lower())[0]
    return f"{org.lower()}/{stem}"


def test_the_paper_recipe_judges_with_a_model_of_another_family():
    paper = load_run_config(REPO / "pipelines" / "configs" / "paper.yaml").params
    paper.check_independent_judge()
    assert not paper.evaluate.allow_dependent_judge
    assert family(paper.judge_model) not in {family(paper.base_model), family(paper.feedback_model)}


# -- cai stage evaluate ----------------------------------------------------------------------------------


def test_the_evaluate_command_refuses_a_judge_that_is_a_policy_before_loading_any_model(tmp_path):
    from cai_lib.cli import app

    result = CliRunner().invoke(
        app,
        [
            "stage", "evaluate", "--policy", f"base={LLAMA}", "--policy", "sl-cai=/no/such/sl-cai",
            "--reward", "/no/such/pm", "--constitution", "harmless@1.0.0", "--prompts", "builtin:red_team",
            "--judge-model", LLAMA, "--out", str(tmp_path / "eval"),
        ],
    )  # fmt: skip
    assert isinstance(result.exception, CaiError)
    assert str(result.exception).startswith(
        f"--judge-model: the judge {LLAMA} is not independent (the judge is also the policy base): "
    )
    assert "--allow-dependent-judge with --dependent-judge-reason" in str(result.exception)
    assert not (tmp_path / "eval").exists()


# -- the report and the MLflow tag say it in one line ----------------------------------------------------


def test_the_report_shows_the_reason_for_a_dependent_judge_in_one_line():
    result = sample_result().model_copy(
        update={
            "judge_dependence": ["the judge is also the feedback model"],
            "dependent_judge_reason": "CPU demo: one model",
        }
    )
    note = judge_note(result)
    assert "\n" not in note and note.endswith("Allowed by the run config: CPU demo: one model.")
    assert "Allowed by the run config: CPU demo: one model." in report_html(result)


def test_an_independent_judge_gets_no_note():
    result = sample_result().model_copy(update={"labeller_ref": "another-model", "judge_dependence": []})
    assert judge_note(result) is None


# -- judging principles and their few-shot text stay out of the training labels ----------------------------


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def training_text(constitution, labelling) -> str:
    """Everything the training side is prompted with: the critique/revision section, and the
    comparison principles and few-shot examples the labeller draws from."""
    examples = labeller_examples(constitution, labelling)
    parts = [str(constitution.section("critique_revision"))]
    parts += [p.question for p in principle_pool(constitution, labelling)]
    parts += [f"{e.conversation} {e.question} {e.answer_a} {e.answer_b} {e.reasoning}" for e in examples]
    return normalised(" ".join(parts))


CASES = [(r, c) for r in RECIPES for c in CONSTITUTIONS]


@pytest.mark.parametrize("recipe, constitution_file", CASES, ids=[f"{r.stem}-{c.parent.name}@{c.stem}" for r, c in CASES])
def test_judging_principles_and_their_few_shot_text_are_disjoint_from_the_training_pool(recipe, constitution_file):
    run = load_run_config(recipe).params
    constitution = load_constitution(str(constitution_file))
    labelling = run.labelling_settings(constitution)
    judges = judging_principles(constitution, run.evaluate)
    trained_on = training_text(constitution, labelling)

    assert not {p.id for p in judges.values()} & {p.id for p in principle_pool(constitution, labelling)}
    for principle in judges.values():
        assert normalised(principle.question) not in trained_on, principle.id
    judge_examples = labeller_examples(constitution, run.evaluate.feedback([p.id for p in judges.values()]))
    assert not [e for e in judge_examples if e in labeller_examples(constitution, labelling)]


def test_the_shipped_constitution_asks_a_judging_question_in_a_few_shot_example_only_the_judge_sees():
    # What the disjointness above guards against: harmless@1.0.0's first comparison example asks the
    # judge's harmlessness question verbatim; the labels' prompts leave it out, the judge's keep it.
    constitution = load_constitution("harmless@1.0.0")
    run = load_run_config(REPO / "pipelines" / "configs" / "quick.yaml").params
    question = judging_principles(constitution, EvaluationConfig())["harmless"].question
    shown_to_labels = labeller_examples(constitution, run.labelling_settings(constitution))
    shown_to_judge = labeller_examples(constitution, EvaluationConfig().feedback(["less-harmful"]))
    assert [e.question for e in constitution.few_shot.comparison].count(question) == 1
    assert question not in [e.question for e in shown_to_labels]
    assert [e.question for e in shown_to_judge] == [question]
