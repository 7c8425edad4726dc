"""Labeller validation: the feedback model checked against human choices before the preference
model trains on its labels (Bai et al. 2022, §4.1, Figure 4).

The paper shows how often its feedback model picks the answer humans picked on the HHH
comparisons, by model size, before it trusts AI labels. Here that check is a pipeline stage,
`validate_labels`, that `train_pm` waits for:

- **the labeller as training uses it**: the run's feedback model with the run's labelling
  settings (`PipelineParams.labelling_settings`: K principles drawn per pair from the pool left
  once the evaluation judge's principles are held out, both option orders, chain of thought and
  its clamp when set), through `cai_lib.method.feedback.FeedbackLabeller`, the class the label
  stage uses;
- **held-out human comparisons**: each source in `sources` (hh-rlhf pairs, or the paper's
  multiple-choice items that carry both compared conversations, as the 438 HHH comparisons do;
  see `cai_lib.method.label_accuracy`), its first `limit` comparisons. A comparison that is also
  one of the preference model's human training pairs (the first `num_human` pairs of
  `human_preferences`) is left out, matched by content, and the count is reported: the labeller
  is not validated on data the PM learns from;
- **what is reported**, per labeller and source: the accuracy (a comparison agrees when
  P(the human's choice better) > 0.5; an exact tie counts half) with its 95% Wilson interval; the
  always-(A) and always-(B) baselines; the position bias (mean P(first-shown answer better) minus
  0.5). The baselines of a multiple-choice file are those of answering by the position the items
  were published in (in the 438 HHH items the correct answer is (A) 228 times, so always-(A)
  scores 52.1%). hh-rlhf has no published order and the labeller asks every comparison both
  ways round, so answering by position is right in exactly one of the two: both baselines are
  0.5 there;
- **Figure 4's comparison**: `compare_models` names further feedback models scored the same way
  beside the configured one; the report then plots accuracy against model.

The gate (`Gates.min_label_accuracy`): the lower end of the 95% interval of the configured
labeller's accuracy must reach it on every source, or the run stops at this stage with one line
naming the source. The stored validation does not depend on the threshold, so a rerun with
another threshold reuses it.

Where it departs: Figure 4 plots accuracy on the HHH comparisons against model size; here any
held-out human comparisons the run names, and the models it names. The default source is
hh-rlhf's harmless-base test split (human harmlessness choices): the HHH items are not on the
Hugging Face hub; give them as a file or `s3://` URI. The quick demo reads `builtin:comparisons`,
16 comparisons the project wrote in hh-rlhf's format so that it needs no hub; they are not human
choices, and the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from cai_lib.core.constitution import Constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.records import Preference
from cai_lib.engines.generation import GenerationBackend, load_backend
from cai_lib.method.evaluation.answers import release_memory
from cai_lib.method.feedback import FeedbackConfig, FeedbackLabeller, check_constitution
from cai_lib.method.human_preferences import read_human_preferences
from cai_lib.method.label_accuracy import (
    AccuracyReport,
    Format,
    detect_format,
    labeller_report,
    position_baselines,
    read_multiple_choice,
)

HH_RLHF_HARMLESS_TEST = "hf:Anthropic/hh-rlhf/harmless-base:test"
# A labeller asked both orders of every comparison is right by position in exactly one of them.
BOTH_ORDERS_BASELINE = 0.5


class LabelValidationConfig(BaseModel):
    """Settings of the validate_labels stage: which human comparisons, and which further labellers."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(
        default_factory=lambda: [HH_RLHF_HARMLESS_TEST],
        min_length=1,
        description="Held-out human comparisons the labeller is scored on: hh-rlhf files or hf: datasets, or "
        "the paper's multiple-choice items with text_correct and text_incorrect (e.g. the 438 HHH comparisons), "
        "as files or s3:// URIs; builtin:comparisons is the project's demo set in hh-rlhf's format (not human "
        "data). Pairs also among the PM's human training pairs are left out.",
    )
    limit: int | None = Field(
        default=200, ge=1, description="Comparisons read from each source (None: all of them)."
    )
    compare_models: list[str] = Field(
        default_factory=list,
        description="Further feedback models scored the same way beside feedback_model, for the report's "
        "accuracy-against-model figure (the paper's Fig. 4). The gate reads only feedback_model.",
    )


class Gates(BaseModel):
    """Checks that stop a run before it spends more compute on a result that cannot hold."""

    model_config = ConfigDict(extra="forbid")

    min_label_accuracy: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Stop the run at validate_labels unless the lower end of the 95% interval of the feedback "
        "labeller's accuracy on every validate_labels source reaches this (None: no gate).",
    )


class ValidatedSource(AccuracyReport):
    """The labeller's agreement with one source of held-out human comparisons."""

    excluded_training_pairs: int = Field(
        description="Comparisons of the source left out because the PM trains on them (human_preferences)."
    )
    baselines_from: Literal["published order", "both orders"] = Field(
        description="published order: always-(A)/(B) as the multiple-choice items were published; both orders: "
        "every comparison is asked both ways round, so answering by position scores 0.5."
    )


class LabellerValidation(BaseModel):
    """One feedback model's validation on every source."""

    model_ref: str = Field(description="The feedback model as the run names it.")
    configured: bool = Field(description="True for the run's feedback_model, the one the gate reads.")
    sources: list[ValidatedSource]


class LabelValidation(BaseModel):
    """What the validate_labels stage stores: every labeller on every source."""

    model_config = ConfigDict(extra="forbid")

    labellers: list[LabellerValidation]
    settings: dict = Field(description="The labelling settings used (those of the label stage).")
    constitution_ref: str
    constitution_sha256: str

    def configured(self) -> LabellerValidation:
        return next(labeller for labeller in self.labellers if labeller.configured)

    def metrics(self) -> dict[str, float]:
        """The configured labeller's numbers, by source index (MLflow keys cannot hold a source's
        ':' or '@'): `label_accuracy.source0`, `label_accuracy_ci_low.source0`, `label_position_bias.source0`."""
        values: dict[str, float] = {}
        for index, source in enumerate(self.configured().sources):
            values[f"label_accuracy.source{index}"] = source.agreement
            values[f"label_accuracy_ci_low.source{index}"] = source.ci_low
            values[f"label_position_bias.source{index}"] = source.position_bias or 0.0
        return values

    def metric_sources(self) -> dict[str, str]:
        """The source behind each group of `metrics`, by the keys' last part: `source0` -> its source."""
        return {f"source{index}": source.source for index, source in enumerate(self.configured().sources)}


class HumanComparisons(NamedTuple):
    """One source's held-out comparisons, ready for the labeller (answer A: the human's choice)."""

    source: str
    format: Format
    pairs: list[Preference]
    baselines: dict[str, float]
    excluded: int


def labeller_names(feedback_model: str, config: LabelValidationConfig) -> list[str]:
    """The labellers a validation scores: the run's feedback model first, then `compare_models`."""
    return list(dict.fromkeys([feedback_model, *config.compare_models]))


def validation_comparisons(
    config: LabelValidationConfig, human_preferences: str, num_human: int
) -> list[HumanComparisons]:
    """The held-out comparisons of a run whose preference model trains on the first `num_human`
    pairs of `human_preferences` ('' for none), read exactly as the PM stage reads them."""
    training = read_human_preferences(human_preferences, limit=num_human) if human_preferences else []
    return held_out_comparisons(config, training)


def held_out_comparisons(
    config: LabelValidationConfig, training_pairs: Sequence[Preference]
) -> list[HumanComparisons]:
    """Each source's first `limit` comparisons less those among `training_pairs` (by content).
    Raises `CaiError` naming the source for a file in neither format, a multiple-choice item
    without both conversations, or a source left empty."""
    training = {pair.id for pair in training_pairs}
    found = []
    for source in config.sources:
        kind = detect_format(source)
        if kind == "hh-rlhf":
            pairs = read_human_preferences(source, config.limit)
            read = len(pairs)
            kept = [pair for pair in pairs if pair.id not in training]
            baselines = {"always_a_baseline": BOTH_ORDERS_BASELINE, "always_b_baseline": BOTH_ORDERS_BASELINE}
        else:
            questions = read_multiple_choice(source, config.limit)
            for number, question in enumerate(questions, start=1):
                if question.pair is None:
                    raise CaiError(
                        f"{source}: row {number}: a multiple-choice item without text_correct and "
                        "text_incorrect cannot be put to the pairwise labeller"
                    )
            kept_questions = [q for q in questions if q.pair.id not in training]
            read, kept = len(questions), [q.pair for q in kept_questions]
            baselines = position_baselines(kept_questions)
        if not kept:
            raise CaiError(f"{source}: every comparison read is among the PM's human training pairs")
        found.append(HumanComparisons(source, kind, kept, baselines, read - len(kept)))
    return found


def validate_labels(
    comparisons: Sequence[HumanComparisons],
    constitution: Constitution,
    models: dict[str, str],
    configured: str,
    settings: FeedbackConfig,
    backends: dict[str, GenerationBackend] | None = None,
) -> LabelValidation:
    """Score each labeller in `models` (the run's name -> the reference to load) on every source,
    with the labelling `settings`; `configured` names the run's feedback model. `backends`, when
    given, are the loaded models by name (tests). One model is loaded at a time."""
    check_constitution(constitution, settings)
    if configured not in models:
        raise CaiError(f"label validation: the feedback model {configured} is not among the models to score")
    labellers = []
    for name, load in models.items():
        model = (backends or {}).get(name) or load_backend(
            load, settings.backend, batch_size=settings.batch_size, engine=settings.engine
        )
        labeller = FeedbackLabeller(model, constitution, name, settings)
        sources = []
        for found in comparisons:
            common = {
                "source": found.source,
                "format": found.format,
                "model_ref": name,
                "constitution_ref": constitution.ref,
                "constitution_sha256": constitution.sha256,
                **found.baselines,
            }
            report = labeller_report(labeller, found.pairs, common)
            sources.append(
                ValidatedSource(
                    **report.model_dump(),
                    excluded_training_pairs=found.excluded,
                    baselines_from="both orders" if found.format == "hh-rlhf" else "published order",
                )
            )
        labellers.append(LabellerValidation(model_ref=name, configured=name == configured, sources=sources))
        del model, labeller
        release_memory()
    return LabelValidation(
        labellers=labellers,
        settings=settings.identity(),
        constitution_ref=constitution.ref,
        constitution_sha256=constitution.sha256,
    )


def gate_failure(validation: LabelValidation, gates: Gates) -> str | None:
    """The one line that stops the run when the configured labeller's accuracy on some source does
    not reach `gates.min_label_accuracy` at the lower end of its 95% interval; None otherwise."""
    bar = gates.min_label_accuracy
    if bar is None:
        return None
    labeller = validation.configured()
    for source in labeller.sources:
        if source.ci_low < bar:
            return (
                f"gates.min_label_accuracy: the feedback labeller {labeller.model_ref} agrees with the human "
                f"labels of {source.source} at {source.agreement:.3f} (95% CI {source.ci_low:.3f}-{source.ci_high:.3f}, "
                f"n={source.n}), below the required {bar:.3f} at the interval's lower end; its labels would "
                "train the preference model on noise. Use a stronger feedback_model or lower the gate"
            )
    return None
