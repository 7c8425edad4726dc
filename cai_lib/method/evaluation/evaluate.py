"""Evaluation of policies on held-out prompts (Bai et al. 2022, §3.3, §4.3-4.4).

Any number of named policies (base, SL-CAI, RL-CAI, ...) answer the held-out red-team and
helpfulness prompts greedily. Then:

- **PM score**: the preference model scores every answer; the mean per policy and prompt set
  is the paper's "PM score" axis (§3.3, §4.5 use PM scores the same way);
- **win rates**: for every two policies and every prompt, a **judge** model compares their
  answers under one comparison principle (a harmlessness one on red-team prompts, a helpfulness
  one on helpfulness prompts), in both A/B orders, with the labeller of `cai_lib.method.feedback`
  (chain-of-thought judgements are not clamped here). a's win rate against b is reported two
  ways, each with a 95% Wilson interval: soft, the mean of the judge's P(a better), which stays
  near 0.5 for a judge that cannot tell answers apart; and hard, the share of decided
  comparisons (P(a better) not 0.5) that a won;
- **Elo**: Bradley-Terry ratings fitted to the hard outcomes (win, loss, exact tie), per
  criterion (`cai_lib.method.evaluation.elo`; mean 1000), with 95% intervals from refitting them on
  prompts resampled with replacement, the form in which the paper reports harmlessness and
  helpfulness (Figures 2, 3, 8). Human-feedback references (`cai_lib.method.references`) given
  among the policies are rated in the same tournament by the same judge;
- **evasiveness** (§4.4): the judge is asked, for each answer, whether it refuses or deflects
  without explaining why, as a Yes/No multiple-choice question scored from the option
  log-probabilities in both orders (no text is generated). The rate is the *mean P(evasive)*
  over prompts; the fraction of answers with P(evasive) > 0.5 is reported beside it;
- **revisions** (from SL-CAI traces): the PM score after each revision round (the paper's
  Figure 5), of the final revision by the number of distinct principles its rounds drew (not
  the paper's Figure 6, which varies the size of the constitution), and per critique/revision principle how often it was drawn and the mean
  change in PM score of its revisions;
- **PM calibration** (Figure 9): the PM's predicted P(A better) against how often A was the
  human's choice, per bin with counts and Wilson intervals, on held-out human pairs whose A/B
  positions are drawn per pair with the evaluation's seed and recorded: the PM benchmark's pairs
  when one is set (held out of every training set), else the PM stage's held-out human pairs;
- **XSTest** (`cai_lib.method.evaluation.xstest`): every policy also answers XSTest's prompts;
  their refusal of the unsafe ones and over-refusal of the safe ones are counted by XSTest's
  string-match rule and by the judge, whose refusal calls are first checked against XSTest's
  human-labelled completions (the judge is loaded once more for this, after the comparisons).

Where it departs: the paper's Elo scores come from crowdworker comparisons; here an AI judge
decides, as in its §2 evaluation of AI supervision. The judge must be independent: not the
feedback model that made the training labels (RL-CAI was optimised against a PM distilled from
that model, so it would be judged by its own teacher), not a policy it judges, and judging by
principles (and few-shot examples) held out of the labels. A dependent judge is refused unless
`EvaluationConfig.allow_dependent_judge` gives a reason, which the report shows in one line
(`cai_lib.method.evaluation.report.judge_note`). Judgements between identical answers are exactly
a draw by construction (both orders are averaged).

Each model is loaded once and freed before the next: each policy in turn, then the PM, then the
judge. Outputs under `out_uri`: `answers.jsonl` (every answer with its PM score and
P(evasive)), `judgements.jsonl` (every pairwise judgement), `metrics.json` (an
`EvaluationResult`, written after those two) and `report.html` (`cai_lib.method.evaluation.report`).
"""

from __future__ import annotations

from collections.abc import Sequence

from cai_lib.core.constitution import ComparisonPrinciple, Constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.names import ANSWERS_FILE, JUDGEMENTS_FILE, METRICS_FILE, REPORT_FILE, canonical_sha256
from cai_lib.core.records import PromptKind, PromptRecord, Trace
from cai_lib.core.store import ArtifactStore
from cai_lib.method.evaluation.answers import answer_all, in_evaluation_order, in_own_process, in_this_process
from cai_lib.method.evaluation.config import (
    CLI_ALLOWANCE,
    CRITERIA,
    Criterion,
    EvaluationConfig,
    check_judge,
    check_policies,
    evaluation_part,
    judge_dependence,
    judging_principles,
)
from cai_lib.method.evaluation.judging import judge
from cai_lib.method.evaluation.pm_scores import (
    benchmark_calibration,
    benchmark_outcomes,
    pm_accuracy,
    pm_calibration,
    score_with_pm,
)
from cai_lib.method.evaluation.refusals import XSTEST_KIND, as_prompt_records, xstest_evaluation
from cai_lib.method.evaluation.results import EvaluationResult, PolicyAnswer, load_result
from cai_lib.method.evaluation.summary import summarise
from cai_lib.method.evaluation.xstest import XSTestPrompt, read_completions
from cai_lib.method.label_accuracy import human_pairs


def evaluate(
    policies: dict[str, str],
    reward_ref: str,
    judge_ref: str,
    constitution: Constitution,
    red_team: Sequence[PromptRecord],
    helpful: Sequence[PromptRecord],
    out_uri: str,
    config: EvaluationConfig | None = None,
    traces: Sequence[Trace] | None = None,
    labeller_ref: str | None = None,
    rl_steps: dict[str, int] | None = None,
    answers: Sequence[PolicyAnswer] | None = None,
    xstest: Sequence[XSTestPrompt] | None = None,
    rounds: dict[str, int] | None = None,
) -> EvaluationResult:
    """Evaluate `policies` (name -> model ref) on held-out prompts and write the results to `out_uri`.

    `judge_ref` judges comparisons and evasiveness. `labeller_ref`, the feedback model that made
    the training labels, is recorded so the report can say when the two are the same model
    (and the evaluation therefore not independent of the training signal).
    `rl_steps` (policy name -> RL step) marks the policies that are checkpoints of one RL run, so
    the report can chart their Elo against the step (Fig. 8); `rounds` (policy name -> round of
    iterated CAI) does the same for the rounds of a run of several. `answers`, when given, are the
    policies' answers made beforehand (the pipeline's sharded `answer_eval` stage): they must
    answer every prompt by every policy, and no policy is loaded here. `xstest`, XSTest's prompts
    (or a subset), are answered by every policy too and reported apart (`EvaluationResult.xstest`).

    Returns the `EvaluationResult` also stored as `out_uri/metrics.json`, beside
    `answers.jsonl`, `judgements.jsonl` and `report.html`; metrics.json is written after the
    other data, so its presence marks a finished evaluation. A rerun with the same inputs
    returns the stored result without loading a model. Raises `CaiError`, before any model is
    loaded and writing nothing, for no policies, a bad policy name, an `rl_steps` name that is not a policy, no red-team prompts, a
    principle that the constitution lacks, a model ref that does not resolve, or an `out_uri`
    that holds an evaluation of other inputs.
    """
    from cai_lib.core.prompts import deduplicate
    from cai_lib.engines.models import resolve_model

    config = config or EvaluationConfig()
    check_policies(policies)
    dependence = dependence_of(judge_ref, policies, labeller_ref, config)
    check_judge(judge_ref, dependence, config, "--judge-model", CLI_ALLOWANCE)
    for given, what in ((rl_steps, "rl_steps"), (rounds, "rounds")):
        if unknown := sorted(set(given or {}) - set(policies)):
            raise CaiError(f"{what} names {', '.join(unknown)}, which are not among the policies evaluated")
    xstest = list(xstest or [])
    prompt_sets = {
        "red_team": deduplicate(red_team),
        "helpful": deduplicate(helpful),
        XSTEST_KIND: as_prompt_records(xstest),
    }
    if not prompt_sets["red_team"]:
        raise CaiError("--prompts: no red-team prompts to evaluate on; check the prompt source")
    principles = judging_principles(
        constitution, config, [c for c, kind in CRITERIA.items() if prompt_sets[kind]]
    )
    traces = list(traces or [])
    benchmark = human_pairs(config.pm_benchmark, config.pm_benchmark_limit) if config.pm_benchmark else []
    completions = (
        read_completions(config.xstest.completions, config.xstest.completions_limit, config.seed)
        if xstest and config.xstest.completions
        else []
    )
    inputs_sha256 = canonical_sha256(
        evaluation_inputs(
            policies, reward_ref, judge_ref, constitution, principles, prompt_sets, traces, config
        )
        | {"pm_benchmark": [pair.id for pair in benchmark]}
        | {"xstest_completions": [(c.id, c.final_label) for c in completions]}
    )
    store = ArtifactStore.open(out_uri)
    if store.exists(METRICS_FILE):
        return finished_evaluation(store, inputs_sha256)
    for ref in [*([] if answers is not None else policies.values()), reward_ref, judge_ref]:
        resolve_model(ref)

    if answers is None:
        answers = answer_all(policies, prompt_sets, config)
    else:
        answers = in_evaluation_order(answers, policies, prompt_sets)
    xstest_answers = [a for a in answers if a.kind == XSTEST_KIND]
    answers = [a for a in answers if a.kind != XSTEST_KIND]
    scored_traces = traces[: config.max_traces]
    answers, trace_pm, benchmark_scores = in_this_process(
        score_with_pm, reward_ref, answers, scored_traces, benchmark, config
    )
    run = in_own_process if config.backend == "vllm" else in_this_process
    answers, judgements = run(judge, judge_ref, constitution, principles, answers, config)
    refusals = (
        run(xstest_evaluation, judge_ref, constitution, xstest, xstest_answers, completions, config)
        if xstest
        else None
    )

    sizes = model_sizes(policies, judge_ref, reward_ref, labeller_ref)
    result = summarise(
        policies,
        reward_ref,
        judge_ref,
        constitution,
        principles,
        prompt_sets,
        answers,
        judgements,
        traces,
        trace_pm,
        config,
        inputs_sha256,
    ).model_copy(
        update={
            "labeller_ref": labeller_ref,
            "judge_dependence": dependence,
            "model_parameters": sizes,
            "dependent_judge_reason": config.dependent_judge_reason if dependence else None,
            "pm_calibration": benchmark_calibration(benchmark, benchmark_scores, config.pm_benchmark, config)
            if benchmark
            else pm_calibration(reward_ref),
            "rl_steps": rl_steps or {},
            "rounds": rounds or {},
            "pm_accuracy": pm_accuracy(config.pm_benchmark, benchmark_outcomes(benchmark_scores))
            if benchmark
            else None,
            "xstest": refusals,
        }
    )
    store.write_jsonl(ANSWERS_FILE, answers + xstest_answers)
    store.write_jsonl(JUDGEMENTS_FILE, judgements)
    store.write_text(METRICS_FILE, result.model_dump_json(indent=2) + "\n")
    from cai_lib.method.evaluation.report import report_html

    store.write_text(REPORT_FILE, report_html(result))
    return result


def model_sizes(
    policies: dict[str, str], judge_ref: str, reward_ref: str, labeller_ref: str | None
) -> dict[str, int]:
    """Parameters of each policy, the judge, the PM and the feedback model, where their configs can
    be read (`parameter_count`); what the report's opening says the run can show rests on them."""
    from cai_lib.engines.models import parameter_count

    roles = {f"policy {name}": ref for name, ref in policies.items()}
    roles |= {"judge": judge_ref, "preference model": reward_ref}
    if labeller_ref:
        roles["feedback model"] = labeller_ref
    counted: dict[str, int | None] = {}
    for ref in dict.fromkeys(roles.values()):
        counted[ref] = parameter_count(ref)
    return {role: counted[ref] for role, ref in roles.items() if counted[ref] is not None}


def dependence_of(
    judge_ref: str, policies: dict[str, str], labeller_ref: str | None, config: EvaluationConfig
) -> list[str]:
    """What the judge is not independent of, one phrase each: the feedback model, a policy it judges,
    or (hold_out_judge_principles off) the principles the training labels were made with."""
    others = {f"the policy {name}": ref for name, ref in policies.items()}
    if labeller_ref:
        others["the feedback model"] = labeller_ref
    found = [f"the judge is also {role}" for role in judge_dependence(judge_ref, others)]
    if not config.hold_out_judge_principles:
        found.append("the judging principles also made the training labels")
    return found


def evaluation_inputs(
    policies: dict[str, str],
    reward_ref: str,
    judge_ref: str,
    constitution: Constitution,
    principles: dict[Criterion, ComparisonPrinciple],
    prompt_sets: dict[PromptKind, list[PromptRecord]],
    traces: Sequence[Trace],
    config: EvaluationConfig,
) -> dict:
    """What determines an evaluation's results (batch size aside), for its fingerprint."""
    return {
        "stage": "evaluate",
        "policies": policies,
        "reward_ref": reward_ref,
        "judge_ref": judge_ref,
        "constitution_part": evaluation_part(constitution, principles),
        "prompts": {kind: [p.id for p in prompts] for kind, prompts in prompt_sets.items()},
        "traces": [t.id for t in traces],
        "config": config.model_dump(mode="json", exclude={"batch_size"}),
    }


def finished_evaluation(store: ArtifactStore, inputs_sha256: str) -> EvaluationResult:
    """The evaluation already stored in `store` when it was made from the same inputs (a rerun, e.g. a
    retried pipeline step, then costs nothing); refuses one made from other inputs."""
    stored = load_result(store.uri)
    if stored.inputs_sha256 != inputs_sha256:
        raise CaiError(
            f"{store.uri}: already holds an evaluation of other inputs; choose another --out (nothing was "
            "overwritten)"
        )
    if not store.exists(REPORT_FILE):
        from cai_lib.method.evaluation.report import report_html

        store.write_text(REPORT_FILE, report_html(stored))
    return stored
