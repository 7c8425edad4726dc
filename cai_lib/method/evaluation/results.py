"""What an evaluation records: every answer, every judgement, and the `EvaluationResult` summary
(`metrics.json`) that the report, the register step and the gate read.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cai_lib.core.constitution import ComparisonPrinciple
from cai_lib.core.errors import CaiError
from cai_lib.core.names import METRICS_FILE
from cai_lib.core.records import PrincipleScore, PromptKind, Record, Trace
from cai_lib.core.stage_table import package_version
from cai_lib.core.store import ArtifactStore
from cai_lib.method.evaluation.config import Criterion, EvaluationConfig
from cai_lib.method.evaluation.xstest import XSTestResult
from cai_lib.method.preference_model import Calibration, drop_undrawn_calibration


class PolicyAnswer(Record):
    """One policy's answer to one held-out prompt, with what the PM and the feedback model made of it."""

    policy: str = Field(description="The policy's name in this evaluation.")
    model_ref: str = Field(description="The policy's model reference.")
    prompt_id: str
    prompt: str
    kind: PromptKind = Field(description="The prompt set: red_team or helpful.")
    answer: str = Field(description="The greedy answer (may be empty).")
    pm_score: float | None = Field(default=None, description="The preference model's score of the answer.")
    p_evasive: float | None = Field(
        default=None, description="The feedback model's P(the answer refuses without explaining why)."
    )


class Judgement(Record):
    """The feedback model's comparison of two policies' answers to one prompt under one principle."""

    criterion: Criterion
    principle_id: str
    prompt_id: str
    prompt: str
    policy_a: str
    policy_b: str
    answer_a: str
    answer_b: str
    label: float = Field(ge=0.0, le=1.0, description="P(policy_a's answer is better), mean of both orders.")
    score: PrincipleScore = Field(description="P(a better) in each order, and any chain of thought.")


class ScoreSummary(BaseModel):
    """Mean, standard deviation and count of a policy's PM scores on one prompt set."""

    mean: float
    std: float
    n: int


class WinRate(BaseModel):
    """How often `policy_a` beat `policy_b` under one criterion, two ways.

    Soft: the mean of the judge's P(a better); a judge that cannot tell reads about 0.5 whatever
    the policies do. Hard: the share of decided comparisons (P(a better) not exactly 0.5) that a
    won, which a judge's small but consistent preferences move. Each with a 95% Wilson interval.
    """

    criterion: Criterion
    policy_a: str
    policy_b: str
    win_rate: float = Field(ge=0.0, le=1.0, description="Soft win rate: mean P(a better).")
    ci_low: float = Field(ge=0.0, le=1.0, description="95% Wilson interval of the soft rate, lower end.")
    ci_high: float = Field(ge=0.0, le=1.0, description="95% Wilson interval of the soft rate, upper end.")
    n: int = Field(description="Prompts compared.")
    hard_win_rate: float = Field(
        ge=0.0, le=1.0, description="Share of decided comparisons that a won (0.5 if none)."
    )
    hard_ci_low: float = Field(ge=0.0, le=1.0, description="95% Wilson interval of the hard rate, lower end.")
    hard_ci_high: float = Field(
        ge=0.0, le=1.0, description="95% Wilson interval of the hard rate, upper end."
    )
    decided: int = Field(description="Comparisons with a winner (the rest are exact ties).")


class EvasivenessSummary(BaseModel):
    """How evasive a policy's answers to one prompt set are, by the feedback model."""

    mean_p_evasive: float = Field(ge=0.0, le=1.0, description="The evasiveness rate: mean P(evasive).")
    evasive_fraction: float = Field(ge=0.0, le=1.0, description="Fraction of answers with P(evasive) > 0.5.")
    n: int


class PrincipleEffect(BaseModel):
    """A critique/revision principle in the SL-CAI traces: how often drawn, and what its revisions did."""

    principle_id: str
    draws: int = Field(description="Rounds that drew this principle, over all traces given.")
    scored_revisions: int = Field(description="Of those, revisions scored by the PM (see max_traces).")
    mean_pm_delta: float | None = Field(
        description="Mean of PM(revision) - PM(answer it revised); None when none was scored."
    )


class RoundScore(BaseModel):
    """PM scores of the SL-CAI answers after one revision round (round 0: the initial answer)."""

    round: int
    mean: float
    n: int


class CountScore(BaseModel):
    """PM scores of final revisions made with a given number of distinct principles."""

    principles: int
    mean: float
    n: int


class PMAccuracy(BaseModel):
    """How often the PM scores the human's choice higher, on `EvaluationConfig.pm_benchmark`."""

    source: str
    n: int = Field(description="Human comparisons scored.")
    agreed: float = Field(
        description="How many the PM scored the human's choice higher on (a tie counts half)."
    )
    accuracy: float
    ci_low: float = Field(description="Lower end of the Wilson 95% interval.")
    ci_high: float = Field(description="Upper end of the Wilson 95% interval.")


class EvaluationResult(BaseModel):
    """Everything an evaluation measured; stored as `metrics.json` and rendered by `cai_lib.method.evaluation.report`."""

    model_config = ConfigDict(extra="forbid")

    policies: dict[str, str] = Field(description="Policy name -> model reference, in evaluation order.")
    reward_ref: str = Field(description="The preference model that gave the PM scores.")
    judge_ref: str = Field(description="The model that judged comparisons and evasiveness.")
    labeller_ref: str | None = Field(
        default=None, description="The feedback model that labelled the training pairs, when known."
    )
    judge_dependence: list[str] = Field(
        default_factory=list,
        description="What the judge is not independent of (the feedback model, a policy, the training "
        "principles), one phrase each; empty for an independent judge.",
    )
    dependent_judge_reason: str | None = Field(
        default=None, description="Why the run allowed a dependent judge (evaluate.dependent_judge_reason)."
    )
    revision_curve: list[RoundScore] = Field(
        default_factory=list,
        description="Mean PM score of the SL-CAI answers after each revision round (Fig. 5).",
    )
    principle_count_curve: list[CountScore] = Field(
        default_factory=list,
        description="Mean PM score of final revisions by the number of distinct principles their rounds drew "
        "(not the paper's Fig. 6, which varies the size of the constitution).",
    )
    rl_steps: dict[str, int] = Field(
        default_factory=dict,
        description="Policy -> the RL step it was saved after (SL-CAI is step 0), for the policies that are "
        "checkpoints of one RL run: the Elo over the course of RL (Fig. 8).",
    )
    pm_calibration: Calibration | None = Field(
        default=None,
        description="The PM's predicted P(A better) against how often A was the human's choice, on held-out "
        "human pairs with drawn positions (Fig. 9).",
    )
    pm_accuracy: PMAccuracy | None = Field(
        default=None,
        description="The PM's agreement with human choices on the PM benchmark, when one is set.",
    )
    xstest: XSTestResult | None = Field(
        default=None, description="Refusals on XSTest's unsafe and safe prompts, when XSTest was run."
    )
    constitution_ref: str
    constitution_sha256: str
    principles: dict[Criterion, ComparisonPrinciple] = Field(
        description="The comparison principle used for each criterion that had prompts."
    )
    evasiveness_question: str
    prompt_counts: dict[PromptKind, int] = Field(description="Held-out prompts per set.")
    pm_scores: dict[PromptKind, dict[str, ScoreSummary]] = Field(
        description="Prompt set -> policy -> PM scores."
    )
    win_rates: list[WinRate] = Field(description="Every ordered pair of policies, per criterion.")
    elo: dict[Criterion, dict[str, float]] = Field(
        description="Criterion -> policy -> Elo rating (mean 1000)."
    )
    elo_intervals: dict[Criterion, dict[str, tuple[float, float]]] = Field(
        default_factory=dict,
        description="Criterion -> policy -> 95% bootstrap interval of its Elo rating (prompts resampled).",
    )
    rounds: dict[str, int] = Field(
        default_factory=dict,
        description="Policy -> its round of iterated CAI (SL-CAI is round 0), for the policies of a run of "
        "several rounds: the Elo by round.",
    )
    model_parameters: dict[str, int] = Field(
        default_factory=dict,
        description="Parameters of the models whose size decides what the run can show (the base policy, "
        "the judge, the PM, the feedback model), where their configs could be read.",
    )
    evasiveness: dict[PromptKind, dict[str, EvasivenessSummary]]
    principle_effects: list[PrincipleEffect] = Field(
        description="Per critique/revision principle, most drawn first."
    )
    traces_given: int = Field(description="SL-CAI traces given (0 without --traces).")
    sample_answers: list[PolicyAnswer] = Field(description="Every policy's answers to the sampled prompts.")
    sample_judgements: list[Judgement] = Field(description="The judgements on the sampled prompts.")
    sample_traces: list[Trace] = Field(description="Sampled SL-CAI traces with revision rounds.")
    config: EvaluationConfig
    inputs_sha256: str = Field(
        description="Fingerprint of the inputs; a rerun with the same ones reuses this result."
    )
    code_version: str = Field(default_factory=package_version)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @field_validator("pm_calibration", mode="before")
    @classmethod
    def _no_undrawn_calibration(cls, value: object) -> object:
        return drop_undrawn_calibration(value)

    def flat_metrics(self) -> dict[str, float]:
        """The numeric results as one flat dict (MLflow / KFP metrics), e.g.
        `win_rate.harmless.rl-cai_vs_sl-cai`, `elo.helpful.base`, `pm_score.red_team.sl-cai`,
        `evasiveness.red_team.base`, `principle.violence.mean_pm_delta`."""
        metrics: dict[str, float] = {f"prompts.{kind}": float(n) for kind, n in self.prompt_counts.items()}
        for kind, per_policy in self.pm_scores.items():
            metrics.update({f"pm_score.{kind}.{name}": s.mean for name, s in per_policy.items()})
        for rate in self.win_rates:
            metrics[f"win_rate.{rate.criterion}.{rate.policy_a}_vs_{rate.policy_b}"] = rate.win_rate
            metrics[f"hard_win_rate.{rate.criterion}.{rate.policy_a}_vs_{rate.policy_b}"] = rate.hard_win_rate
        for criterion, ratings in self.elo.items():
            metrics.update({f"elo.{criterion}.{name}": rating for name, rating in ratings.items()})
        for criterion, intervals in self.elo_intervals.items():
            for name, (low, high) in intervals.items():
                metrics[f"elo_ci_low.{criterion}.{name}"] = low
                metrics[f"elo_ci_high.{criterion}.{name}"] = high
        if self.pm_accuracy is not None:
            metrics["pm_accuracy"] = self.pm_accuracy.accuracy
        for kind, per_policy in self.evasiveness.items():
            for name, summary in per_policy.items():
                metrics[f"evasiveness.{kind}.{name}"] = summary.mean_p_evasive
                metrics[f"evasive_fraction.{kind}.{name}"] = summary.evasive_fraction
        for effect in self.principle_effects:
            metrics[f"principle.{effect.principle_id}.draws"] = float(effect.draws)
            if effect.mean_pm_delta is not None:
                metrics[f"principle.{effect.principle_id}.mean_pm_delta"] = effect.mean_pm_delta
        if self.xstest is not None:
            metrics.update(self.xstest.flat_metrics())
        return metrics

    def metric_sources(self) -> dict[str, str]:
        """The outside data set behind each group of `flat_metrics` that was measured on one:
        `xstest` (the `xstest.*` metrics) and `pm_accuracy`."""
        sources = {
            "xstest": self.xstest.source if self.xstest else "",
            "pm_accuracy": self.pm_accuracy.source if self.pm_accuracy else "",
        }
        return {group: source for group, source in sources.items() if source}


def win_rate(result: EvaluationResult, criterion: Criterion, a: str, b: str) -> float:
    """How often policy `a` beat policy `b` under `criterion` (harmless or helpful) in `result`."""
    return find_win_rate(result, criterion, a, b).win_rate


def find_win_rate(result: EvaluationResult, criterion: Criterion, a: str, b: str) -> WinRate:
    """`a`'s win rate against `b` under `criterion` in `result`, with its interval and count."""
    for rate in result.win_rates:
        if (rate.criterion, rate.policy_a, rate.policy_b) == (criterion, a, b):
            return rate
    compared = sorted({r.policy_a for r in result.win_rates if r.criterion == criterion})
    raise CaiError(
        f"no {criterion} win rate of '{a}' against '{b}' (policies compared: {', '.join(compared)})"
    )


def load_result(out_uri: str) -> EvaluationResult:
    """The `EvaluationResult` stored at `out_uri/metrics.json`."""
    store = ArtifactStore.open(out_uri)
    if not store.exists(METRICS_FILE):
        raise CaiError(f"{store.uri_of(METRICS_FILE)}: no evaluation there; run `cai stage evaluate` first")
    try:
        return EvaluationResult.model_validate_json(store.read_text(METRICS_FILE))
    except ValueError as err:
        raise CaiError(
            f"{store.uri_of(METRICS_FILE)}: not an evaluation result ({str(err).splitlines()[0]})"
        ) from None
