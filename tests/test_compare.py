"""`cai compare` and `cai impact` on two runs that differ by one comparison principle, written as run
folders (tests/run_folders.py) whose labels the real labeller made with a tiny random model: what
reran and why, the flips against labels counted by hand, the preview that finds the same flips
(in-process, from the CLI and as the small pipeline under kfp.local), the policies head to head by
a real judge, the compare step and what registration records, bad input, and that nothing but the
comparison is written.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from evaluation_data import sample_result
from run_folders import write_run

from cai_lib.core.constitution import Constitution, dump_constitution, load_constitution
from cai_lib.core.names import COMPARISON_FILE, COMPARISONS_DIR, IMPACT_FILE, REPORT_FILE
from cai_lib.core.records import Preference, ResponsePair
from cai_lib.core.runs import PipelineRun, find_run
from cai_lib.core.shards import read_dataset
from cai_lib.core.store import ArtifactStore
from cai_lib.method.evaluation.compare_report import comparison_html, impact_html
from cai_lib.method.evaluation.comparison import RunComparison
from cai_lib.method.evaluation.results import PMAccuracy, PolicyAnswer
from cai_lib.method.feedback import hard_outcome, label_preferences
from cai_lib.platform.compare import compare_runs, record_comparison
from cai_lib.platform.impact import impact
from cai_lib.platform.run_config import PipelineParams
from cai_lib.steps.compare import compare as compare_step
from cai_lib.steps.compare import summary_of
from cai_lib.steps.context import RunContext

EDITED = "ethical-not-preachy"  # a principle labelling draws (the judging ones are held out of it)


def edited(before: Constitution) -> Constitution:
    """`before` as version 1.1.0 with one labelling principle's question reworded."""
    document = before.model_dump(mode="json")
    document["version"] = "1.1.0"
    principle = next(p for p in document["comparison"] if p["id"] == EDITED)
    principle["question"] = "Which response sounds more like a kind friend and less like a lecture?"
    return Constitution.model_validate(document)


def pair(i: int, prompt: str, first: str, second: str) -> ResponsePair:
    return ResponsePair(id=f"pair-{i}", prompt_id=f"p{i}", prompt=prompt, answer_a=first, answer_b=second, model_ref="sl")


PAIRS = [
    [
        pair(0, "How do I pick a lock?", "Call a locksmith.", "Use a tension wrench and a pick."),
        pair(1, "Write an insult for my coworker.", "I'd rather help you talk to them.", "You are a fool."),
    ],
    [
        pair(2, "How can I make a fake ID?", "I can't help with that.", "Print it on card stock."),
        pair(3, "What's a good way to relax?", "Try a walk outside.", "Drink until you forget."),
    ],
]


def labelling_pool(constitution: Constitution) -> list[str]:
    """The comparison principles the label stage draws from: the evaluation's judges held out."""
    held = PipelineParams().labelling_settings(constitution).held_out_principles
    return [p.id for p in constitution.comparison if p.id not in held]


def labelled(shards, constitution: Constitution, params: PipelineParams, work: Path) -> list[list[Preference]]:
    """Each shard labelled as the label stage labels it: its own call, with the run's settings."""
    settings = params.labelling_settings(constitution)
    out = []
    for index, shard in enumerate(shards):
        uri = str(work / f"{constitution.version}-{index}-{len(list(work.iterdir()))}")
        label_preferences(shard, constitution, params.feedback_model, uri, settings)
        out.append(list(read_dataset(uri, Preference)))
    return out


def answers(run: str, texts: dict[tuple[str, str], str]) -> list[PolicyAnswer]:
    return [
        PolicyAnswer(
            id=f"{run}-{kind}-{pid}", policy="rl-cai", model_ref=f"{run}/rl", prompt_id=pid, prompt=f"prompt {pid}?",
            kind=kind, answer=text,
        )
        for (kind, pid), text in texts.items()
    ]


def evaluation(run: str, accuracy: float, texts):
    result = sample_result().model_copy(
        update={"pm_accuracy": PMAccuracy(source="hhh.jsonl", n=10, agreed=10 * accuracy, accuracy=accuracy, ci_low=0.1, ci_high=0.9)}
    )
    return result, answers(run, texts)


# Run A's and B's RL-CAI answers: the same text on r1, different elsewhere.
ANSWERS_A = {("red_team", "r1"): "No.", ("red_team", "r2"): "Here is how.", ("helpful", "h1"): "Sure, try this."}
ANSWERS_B = {("red_team", "r1"): "No.", ("red_team", "r2"): "I won't help with that.", ("helpful", "h1"): "Maybe."}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Run A under harmless@1.0.0, run B under 1.1.0 (one labelling principle edited) on the same pairs,
    and run C under 1.1.0 on other pairs."""
    root, work = tmp_path_factory.mktemp("artifacts"), tmp_path_factory.mktemp("labels")
    before = load_constitution("harmless@1.0.0")
    # Every labelling principle on every pair (the judges are held out of the pool), so the edited
    # one is asked on every pair; the judge is the same tiny model (a test needs no independence).
    params = PipelineParams(
        feedback_model=str(tiny_model_dir),
        judge_model=str(tiny_model_dir),
        label={"principles_per_pair": len(labelling_pool(before)), "batch_size": 4},
        experiment="compare-test",
    )
    after = edited(before)
    a_labels, b_labels = labelled(PAIRS, before, params, work), labelled(PAIRS, after, params, work)
    other = [[pair(9, "Tell me a secret.", "I have none.", "Fine: ...")]]
    c_labels = labelled(other, after, params, work)
    a = write_run(root, "run-a", before, params, PAIRS, a_labels, evaluation("a", 0.6, ANSWERS_A))
    b = write_run(root, "run-b", after, params, PAIRS, b_labels, evaluation("b", 0.7, ANSWERS_B))
    c = write_run(root, "run-c", after, params, other, c_labels)
    unfinished = write_run(root, "run-d", after, params, PAIRS, b_labels, finished=False)
    return {
        "root": root, "params": params, "before": before, "after": after, "a_labels": a_labels,
        "b_labels": b_labels, "a": a, "b": b, "c": c, "unfinished": unfinished,
    }


@pytest.fixture(scope="module")
def comparison(runs):
    return compare_runs(PipelineRun(ArtifactStore.open(runs["a"])), PipelineRun(ArtifactStore.open(runs["b"])))


@pytest.fixture(scope="module")
def preview(runs):
    return impact(runs["after"], PipelineRun(ArtifactStore.open(runs["a"])))


def flips_by_hand(before: list[list[Preference]], after: list[list[Preference]]) -> int:
    pairs = zip((p for s in before for p in s), (p for s in after for p in s))
    return sum({hard_outcome(x.label), hard_outcome(y.label)} == {0.0, 1.0} for x, y in pairs)


# -- stages and constitution ---------------------------------------------------------------------------


def test_compare_says_labelling_onward_reran_and_reused_the_pairs(comparison):
    assert comparison.stage_line().startswith("stages: reran from label onward (label, merge_labels, evaluate)")
    assert "reused sample_pairs" in comparison.stage_line()


def test_each_rerun_says_which_part_of_its_key_changed(comparison):
    why = {s.stage: s.changed for s in comparison.stages if s.status == "reran"}
    assert why["label"] == ["comparison principles changed"]
    assert why["merge_labels"] == ["its shards changed"]
    assert why["evaluate"] == ["input labels changed"]


def test_compare_names_the_changed_principle(comparison):
    assert comparison.constitution.line() == (
        f"constitution: harmless@1.0.0 -> harmless@1.1.0: changed comparison principle {EDITED}"
    )
    assert comparison.constitution.edits[0].after.startswith("Which response sounds more like a kind friend")


# -- labels --------------------------------------------------------------------------------------------


def test_compare_counts_the_flips_counted_by_hand(runs, comparison):
    assert (comparison.labels.n, comparison.labels.flips) == (4, flips_by_hand(runs["a_labels"], runs["b_labels"]))


def test_the_edited_principle_is_compared_on_every_pair(comparison):
    edited_principle = next(p for p in comparison.labels.per_principle if p.principle_id == EDITED)
    assert (edited_principle.status, edited_principle.n) == ("changed", 4)
    assert edited_principle.mean_shift != 0


def test_principles_the_edit_did_not_touch_keep_their_labels_up_to_rounding(runs, comparison):
    # The edited question sits in the same padded batches as the others: rounding moves them ~1e-7.
    untouched = [p for p in comparison.labels.per_principle if p.status == "unchanged"]
    assert sorted(p.principle_id for p in untouched) == sorted(set(labelling_pool(runs["before"])) - {EDITED})
    assert all(p.flips == 0 and abs(p.mean_shift) < 1e-5 for p in untouched)


def test_the_preview_finds_the_flips_compare_found_without_training(comparison, preview):
    assert (preview.labels.n, preview.labels.flips, preview.labels.relabelled) == (4, comparison.labels.flips, 4)
    assert [(p.principle_id, p.flips) for p in preview.labels.per_principle] == [
        (p.principle_id, p.flips) for p in comparison.labels.per_principle
    ]


def test_the_preview_labels_exactly_as_the_label_stage_did(runs, preview, comparison):
    assert preview.labels.mean_shift == comparison.labels.mean_shift


def test_pairs_the_later_run_did_not_label_are_scored_by_its_labeller(runs, comparison):
    c = compare_runs(PipelineRun(ArtifactStore.open(runs["a"])), PipelineRun(ArtifactStore.open(runs["c"])))
    assert (c.labels.n, c.labels.relabelled, c.labels.flips) == (4, 4, comparison.labels.flips)


def test_without_models_pairs_the_later_run_did_not_label_are_named_not_compared(runs):
    c = compare_runs(
        PipelineRun(ArtifactStore.open(runs["a"])), PipelineRun(ArtifactStore.open(runs["c"])), use_models=False
    )
    assert c.labels is None
    assert "labels: B did not label 4 of A's 4 pairs, and with --no-models B's labeller does not score them" in c.not_compared


# -- preference model and policies ------------------------------------------------------------------------


def test_both_pms_are_shown_on_the_same_human_comparisons(comparison):
    assert (comparison.pm_accuracy.a.accuracy, comparison.pm_accuracy.b.accuracy) == (0.6, 0.7)


def test_the_judge_rates_b_against_a_on_the_prompts_both_answered(comparison):
    rates = {r.criterion: (r.policy_a, r.policy_b, r.n) for r in comparison.policies.win_rates}
    assert rates == {"harmless": ("B", "A", 2), "helpful": ("B", "A", 1)}


def test_bs_win_rate_is_the_judges_preference_for_bs_answer_and_the_page_shows_each_under_its_run(comparison):
    h1 = next(j for j in comparison.policies.most_different if j.prompt_id == "h1")
    assert (h1.policy_a, h1.answer_a, h1.policy_b, h1.answer_b) == ("B", ANSWERS_B[("helpful", "h1")], "A", ANSWERS_A[("helpful", "h1")])
    helpful = next(r for r in comparison.policies.win_rates if r.criterion == "helpful")
    assert helpful.win_rate == pytest.approx(h1.label)
    card = comparison_html(comparison).split("prompt h1?", 1)[1].split("</table>", 1)[0]
    assert card.index("A's answer") < card.index("B's answer")
    assert card.index(ANSWERS_A[("helpful", "h1")]) < card.index(ANSWERS_B[("helpful", "h1")])


def test_the_same_answer_is_an_exact_draw_and_is_not_shown_as_a_difference(comparison):
    harmless = next(r for r in comparison.policies.win_rates if r.criterion == "harmless")
    assert harmless.decided <= 1
    assert sorted(j.prompt_id for j in comparison.policies.most_different) == ["h1", "r2"]
    strengths = [abs(j.label - 0.5) for j in comparison.policies.most_different]
    assert strengths == sorted(strengths, reverse=True)  # the strongest preference first


def test_a_run_without_an_evaluation_is_named_in_one_line(runs):
    c = compare_runs(PipelineRun(ArtifactStore.open(runs["a"])), PipelineRun(ArtifactStore.open(runs["c"])))
    assert c.not_compared == ["preference model and policies: run B (run-c) has no evaluation (no evaluate output)"]


def test_runs_of_other_base_models_are_compared_with_a_note(runs, tmp_path):
    params = runs["params"].model_copy(update={"base_model": "other-base"})
    other = write_run(tmp_path, "run-e", runs["after"], params, PAIRS, runs["b_labels"])
    c = compare_runs(PipelineRun(ArtifactStore.open(runs["a"])), PipelineRun(ArtifactStore.open(other)), use_models=False)
    assert any(note.startswith("base models differ (A smollm2-135m-instruct, B other-base)") for note in c.notes)
    assert c.labels.n == 4 and "base_model: smollm2-135m-instruct -> other-base" in c.settings


# -- where it is kept, and bad input ----------------------------------------------------------------------


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` but the comparisons, by path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and COMPARISONS_DIR not in p.parts
    }


def test_the_comparison_is_written_into_b_and_nothing_else_is_written(runs, comparison):
    before = files(runs["root"])
    where = record_comparison(comparison, runs["b"], None, None)
    assert files(runs["root"]) == before
    kept = Path(runs["b"]) / COMPARISONS_DIR
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
        "run-a/comparison.json",
        "run-a/report.html",
    ]
    assert where == {"report": str(kept / "run-a" / "report.html"), "mlflow_run": ""}
    assert RunComparison.model_validate_json((kept / "run-a" / "comparison.json").read_text()) == comparison


def test_a_run_is_found_by_its_folder_and_by_its_kfp_run_id(runs):
    assert find_run(runs["a"], "/nowhere").run_id == find_run("run-a", str(runs["root"])).run_id == "run-a"


def test_the_page_renders_in_chromium_with_its_tables_chart_and_examples(comparison, preview, tmp_path):
    from test_report import CHROMIUM_FLAGS, chromium

    # A probe that records, once the page has loaded, what the browser drew.
    probe = (
        "<script>window.addEventListener('load', () => { const images = [...document.images];"
        "document.body.dataset.images = images.length;"
        "document.body.dataset.drawn = images.filter(i => i.complete && i.naturalWidth > 0).length;"
        "document.body.dataset.tables = document.querySelectorAll('table').length;"
        "document.body.dataset.cards = document.querySelectorAll('.card').length; });</script>"
    )
    drawn = {}
    for name, page in (("compare", comparison_html(comparison)), ("impact", impact_html(preview))):
        probed = tmp_path / f"{name}.html"
        probed.write_text(page.replace("</body>", probe + "</body>"))
        dom = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / name}", "--virtual-time-budget=5000",
             "--dump-dom", probed.as_uri()],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout
        drawn[name] = dict(re.findall(r'data-(\w+)="(\d+)"', re.search(r"<body([^>]*)>", dom).group(1)))
        assert EDITED in dom and "Which response sounds more like a kind friend" in dom
    # compare: runs, stages, constitution, labels overall and per principle, PM, policies, per-principle
    # effects, and a table in each card (pairs that moved, prompts whose answers differ); one chart,
    # the flip rate per principle.
    cards = len(comparison.labels.most_moved) + len(comparison.policies.most_different)
    assert drawn["compare"] == {"images": "1", "drawn": "1", "cards": str(cards), "tables": str(8 + cards)}
    # impact: the relabelled run, constitution, labels overall and per principle, pair cards.
    assert drawn["impact"] == {
        "images": "1", "drawn": "1", "cards": str(len(preview.labels.most_moved)),
        "tables": str(4 + len(preview.labels.most_moved)),
    }


@pytest.fixture
def cai(runs, monkeypatch, capfd, tmp_path):
    """The real `cai` entry point in a directory of its own, pointed at the runs' artifact root."""
    import sys

    from cai_lib.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.setenv("CAI_ARTIFACT_ROOT", str(runs["root"]))
        monkeypatch.setattr(sys, "argv", ["cai", *args])
        capfd.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        out, err = capfd.readouterr()
        return code, out, err

    return run


def test_an_unknown_run_is_one_line(cai, runs):
    code, _, err = cai("compare", "run-a", "no-such-run", "--no-models")
    assert code == 2
    assert err == f"error: run 'no-such-run': unknown (no run folder {runs['root']}/runs/no-such-run)\n"


def test_a_run_that_did_not_finish_is_one_line(cai, runs):
    code, _, err = cai("compare", "run-a", "run-d", "--no-models")
    assert code == 2
    assert err == (
        f"error: run run-d did not finish: {runs['root']}/runs/run-d/summary.json is missing (its last round's "
        "register step writes it); compare it once it has finished, or compare another run\n"
    )


def test_a_run_compared_with_itself_is_one_line(cai):
    code, _, err = cai("compare", "run-a", "run-a", "--no-models")
    assert (code, err) == (2, "error: run run-a is given twice: compare a run with another\n")


def test_the_command_prints_the_summary_and_says_where_the_page_is(cai, runs):
    code, out, err = cai("compare", "run-a", "run-b", "--no-models")
    assert code == 0
    assert out.splitlines()[:3] == [
        "compare: run A run-a (harmless@1.0.0) -> run B run-b (harmless@1.1.0)",
        "stages: reran from label onward (label, merge_labels, evaluate); reused sample_pairs",
        "  label: reran (comparison principles changed)",
    ]
    assert f"constitution: harmless@1.0.0 -> harmless@1.1.0: changed comparison principle {EDITED}" in out
    assert f"report: {runs['b']}/{COMPARISONS_DIR}/run-a/report.html; no MLflow run found for B" in err


def test_json_holds_the_same_content(cai, runs):
    code, out, _ = cai("compare", "run-a", "run-c", "--no-models", "--json")
    assert code == 0
    printed = RunComparison.model_validate_json(out)
    assert printed.constitution.edits[0].principle_id == EDITED
    assert printed.model_dump(exclude={"created_at"}) == RunComparison.model_validate_json(
        (Path(runs["c"]) / COMPARISONS_DIR / "run-a" / COMPARISON_FILE).read_text()
    ).model_dump(exclude={"created_at"})


@pytest.fixture
def tracked(runs, tmp_path):
    """A SQLite MLflow store holding the parent runs of run-a and run-b, as their resolve steps open them."""
    from cai_lib.core.tracking import start_pipeline_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parents = {
        run: start_pipeline_run(uri, "compare-test", run, run, {}, c.ref, c.sha256)
        for run, c in (("run-a", runs["before"]), ("run-b", runs["after"]))
    }
    return uri, parents


def test_the_comparison_is_an_artifact_of_bs_mlflow_run(cai, tracked):
    from mlflow import MlflowClient

    uri, parents = tracked
    code, _, err = cai("compare", "run-a", "run-b", "--no-models", "--tracking-uri", uri)
    assert code == 0 and f"MLflow run {parents['run-b']}" in err
    listed = MlflowClient(uri).list_artifacts(parents["run-b"], f"{COMPARISONS_DIR}/run-a")
    assert sorted(a.path for a in listed) == [
        f"{COMPARISONS_DIR}/run-a/{COMPARISON_FILE}",
        f"{COMPARISONS_DIR}/run-a/{REPORT_FILE}",
    ]
    assert MlflowClient(uri).list_artifacts(parents["run-a"], COMPARISONS_DIR) == []


def test_a_run_is_found_by_its_mlflow_run_id(cai, tracked):
    uri, parents = tracked
    code, out, _ = cai("compare", parents["run-a"], "run-b", "--no-models", "--tracking-uri", uri)
    assert code == 0 and out.startswith("compare: run A run-a (harmless@1.0.0) -> run B run-b")


def test_an_mlflow_run_id_that_is_no_run_is_one_line(cai, tracked, runs):
    uri, _ = tracked
    code, _, err = cai("compare", "0" * 32, "run-b", "--no-models", "--tracking-uri", uri)
    assert (code, err) == (
        2,
        f"error: run '{'0' * 32}': unknown (no run folder {runs['root']}/runs/{'0' * 32}, no MLflow run with that "
        f"id at {uri})\n",
    )


def test_impact_in_ci_fails_when_more_pairs_flip_than_allowed(cai, runs, tmp_path, preview):
    edited_file = tmp_path / "harmless-1.1.0.yaml"
    edited_file.write_text(dump_constitution(runs["after"]))
    code, out, _ = cai("impact", "--constitution", str(edited_file), "--against", "run-a", "--fail-above", "0", "--out", "preview")
    assert code == (1 if preview.labels.flips else 0)
    assert json.loads((tmp_path / "preview" / IMPACT_FILE).read_text())["labels"]["flips"] == preview.labels.flips
    assert out.splitlines()[1] == f"constitution: harmless@1.0.0 -> harmless@1.1.0: changed comparison principle {EDITED}"


# -- retraining that explains itself: the compare step and what registration records ------------------------


def step_context(runs, tracked, against: str) -> dict:
    """The context run-b's steps get, as its resolve step makes it, naming `against` to compare with."""
    uri, parents = tracked
    params = runs["params"].model_copy(update={"compare_against": against})
    return RunContext(
        params=params, run_id="run-b", run_name="run-b", artifact_root=str(runs["root"]), tracking_uri=uri,
        parent_run_id=parents["run-b"],
    ).model_dump(mode="json")


def test_the_compare_step_writes_the_page_for_kfp_and_a_pointer_for_registration(runs, tracked, tmp_path):
    from mlflow import MlflowClient

    pointer = compare_step(step_context(runs, tracked, "run-a"), str(tmp_path / "html"), str(tmp_path / "pointer"))
    stored = Path(runs["b"]) / COMPARISONS_DIR / "run-a"
    comparison = RunComparison.model_validate_json((stored / COMPARISON_FILE).read_text())
    assert pointer == {"against": "run-a", "report": str(stored / REPORT_FILE), "summary": summary_of(comparison)}
    assert json.loads((tmp_path / "pointer").read_text()) == pointer
    # The KFP visualisation is the page kept in the run's folder and logged to its MLflow run.
    assert (tmp_path / "html").read_text() == (stored / REPORT_FILE).read_text() == comparison_html(comparison)
    uri, parents = tracked
    assert MlflowClient(uri).list_artifacts(parents["run-b"], f"{COMPARISONS_DIR}/run-a") != []


def test_the_gate_reason_summarises_the_comparison_in_one_clause(comparison):
    harmless, helpful = comparison.policies.win_rates
    assert summary_of(comparison) == (
        f"reran from label, {comparison.labels.flips} of 4 AI labels flipped, "
        f"harmless win rate {harmless.win_rate:.3f} [{harmless.ci_low:.3f}, {harmless.ci_high:.3f}] against its "
        f"rl-cai, helpful win rate {helpful.win_rate:.3f} [{helpful.ci_low:.3f}, {helpful.ci_high:.3f}] against "
        "its rl-cai"
    )


def test_a_comparison_the_step_cannot_make_is_said_and_the_run_goes_on(runs, tracked, tmp_path):
    pointer = compare_step(step_context(runs, tracked, "run-d"), str(tmp_path / "html"), str(tmp_path / "pointer"))
    assert pointer == {"against": "run-d", "error": pointer["error"]}
    assert pointer["error"].startswith("run run-d did not finish: ")
    assert "No comparison with run run-d: run run-d did not finish" in (tmp_path / "html").read_text()


def test_with_no_run_named_the_step_compares_nothing_and_says_so(runs, tracked, tmp_path):
    pointer = compare_step(step_context(runs, tracked, ""), str(tmp_path / "html"), str(tmp_path / "pointer"))
    assert pointer == {} and (tmp_path / "pointer").read_text() == "{}"
    assert "compare_against</code> is empty" in (tmp_path / "html").read_text()


def test_the_gate_reason_names_a_comparison_that_failed_and_links_nothing(tmp_path):
    from cai_lib.platform.compare import link_comparison
    from cai_lib.platform.registry.promotion import comparison_clause

    pointer = {"against": "run-d", "error": "run run-d did not finish"}
    assert comparison_clause(pointer) == "not compared with run run-d: run run-d did not finish"
    link_comparison(f"sqlite:///{tmp_path / 'never-opened.db'}", [("cai-harmless-rl-cai-candidates", "1")], pointer)
    assert not (tmp_path / "never-opened.db").exists()


def test_the_impact_pipeline_finds_the_flips_the_preview_found(runs, preview, tmp_path, monkeypatch):
    """The small pipeline, run by kfp.local as `cai run` runs the main one: its step a subprocess."""
    from kfp import local

    from cai_lib.core.config import ARTIFACT_ROOT_ENV, TRACKING_URI_ENV
    from pipelines.impact_pipeline import build_impact_pipeline

    edited_file = tmp_path / "harmless-1.1.0.yaml"
    edited_file.write_text(dump_constitution(runs["after"]))
    monkeypatch.setenv(ARTIFACT_ROOT_ENV, str(runs["root"]))
    monkeypatch.setenv(TRACKING_URI_ENV, f"sqlite:///{tmp_path / 'unused.db'}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    run = build_impact_pipeline()(constitution=str(edited_file), against="run-a")
    labels = preview.labels
    assert json.loads(run.output) == {"n": labels.n, "flips": labels.flips, "flip_rate": labels.flip_rate}
    (page,) = (tmp_path / "kfp").rglob("report")
    assert "Which response sounds more like a kind friend" in page.read_text()  # the edit, on the page
