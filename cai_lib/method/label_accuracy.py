"""How often the AI feedback labeller agrees with human labels (Bai et al. 2022, §4.1, Figure 4).

The paper checks its feedback model against human choices before trusting its labels. The check
here puts every human comparison through **the same labeller that labels the training pairs**
(`cai_lib.method.feedback`: K principles drawn per pair and ensembled, both option orders asked and
averaged, chain of thought when `cot` is set), not through the raw model. Two real formats are
read, detected per file from its first row:

- **hh-rlhf** rows `{"chosen", "rejected"}` (read by `cai_lib.method.human_preferences`);
- **multiple choice**, the format in which the paper's authors published their evaluations
  (`evals/*.jsonl` of anthropics/ConstitutionalHarmlessnessPaper): rows with `prompt`,
  `corrects` and `incorrects` (option strings such as " (B)"). Rows that also carry the two
  compared conversations (`text_correct`, `text_incorrect`, as the 438 HHH comparisons do) become
  pairs and go through the labeller. Files whose rows lack them (classification items with more
  than two options, or with no answer texts) cannot be put to a pairwise labeller: their items
  are scored as published, by the summed log-probability of each option after the question, and
  the report says so.

A comparison agrees when P(the human's choice better) > 0.5; a tie (exactly 0.5, e.g. a labeller
that only ever names the first option, whose two orders cancel) counts as half. Beside the
accuracy with its Wilson 95% interval (`cai_lib.method.evaluation.elo.wilson_interval`), the report gives:

- **always-(A) and always-(B) baselines** of a multiple-choice file: the accuracy of answering by
  position as published (in the 438 HHH comparisons the correct answer is (A) 228 times, so
  always-(A) scores 52.1%). hh-rlhf has no published order; both orders are asked, so a
  position-only labeller scores exactly 0.5 there;
- the labeller's **position bias**: its mean probability for whichever answer is shown first,
  minus 0.5 (0 for an unbiased labeller, +0.5 for one that always names the first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from cai_lib.core.constitution import Constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.prompts import HF_PREFIX, RowError, json_rows
from cai_lib.core.records import Preference
from cai_lib.engines.generation import GenerationBackend, load_backend
from cai_lib.method.evaluation.elo import agreement
from cai_lib.method.feedback import (
    FeedbackConfig,
    FeedbackLabeller,
    check_constitution,
    few_shot_messages,
    hard_outcome,
)
from cai_lib.method.human_preferences import (
    UnusableRow,
    human_preference,
    read_human_preferences,
    split_hh_pair,
)

HH_FIELDS = ("chosen", "rejected")
MC_FIELDS = ("prompt", "corrects", "incorrects")
Format = Literal["hh-rlhf", "multiple-choice"]


class MultipleChoiceRow(BaseModel):
    """One published multiple-choice question."""

    prompt: str = Field(description="The full question, ending in 'The answer is:'.")
    corrects: list[str] = Field(description="Options a correct answer may be, e.g. [' (B)'].")
    incorrects: list[str] = Field(description="Options that are wrong, e.g. [' (A)'].")
    pair: Preference | None = Field(
        default=None,
        description="The two compared conversations as a pair (A: the correct one), when the row has "
        "text_correct and text_incorrect.",
    )


class AccuracyReport(BaseModel):
    """The labeller's agreement with human labels on one source."""

    source: str = Field(description="The human-labelled source that was read.")
    format: Format = Field(description="The detected format of the source.")
    scoring: Literal["labeller", "as published"] = Field(
        description="labeller: each comparison through the training labeller (principles, both orders, CoT); "
        "as published: multiple-choice items without answer texts, each option scored after the question."
    )
    model_ref: str = Field(description="The feedback model.")
    constitution_ref: str = Field(
        description="name@version of the constitution (its few-shot examples and principles)."
    )
    constitution_sha256: str = Field(description="Content hash of that constitution.")
    n: int = Field(description="Human-labelled comparisons scored.")
    agreed: float = Field(description="How many of them the labeller agreed with (a tie counts half).")
    agreement: float = Field(description="agreed / n.")
    ci_low: float = Field(description="Lower end of the Wilson 95% interval of the agreement.")
    ci_high: float = Field(description="Upper end of the Wilson 95% interval of the agreement.")
    always_a_baseline: float | None = Field(
        default=None, description="Multiple choice: the accuracy of always answering (A), as published."
    )
    always_b_baseline: float | None = Field(
        default=None, description="Multiple choice: the accuracy of always answering (B), as published."
    )
    position_bias: float | None = Field(
        default=None,
        description="Labeller: mean P(the answer shown first is better) minus 0.5; None as published.",
    )
    mean_p_human_choice: float | None = Field(
        default=None, description="Labeller: the mean soft probability of the human's choice."
    )
    config: dict = Field(default_factory=dict, description="The labeller settings used.")

    def lines(self) -> list[str]:
        """Baselines and position bias, one line each, for the CLI (before `summary`)."""
        shown = []
        if self.always_a_baseline is not None:
            shown.append(
                f"always-(A) baseline {self.always_a_baseline:.3f}, always-(B) baseline {self.always_b_baseline:.3f}"
            )
        if self.position_bias is not None:
            shown.append(f"position bias {self.position_bias:+.3f} (mean P(first-shown answer better) - 0.5)")
        return shown

    def summary(self) -> str:
        """One line ending in the agreement and its count, e.g. for the CLI's last line."""
        unit = "pairs" if self.format == "hh-rlhf" else "questions"
        return f"agreement {self.agreement:.2f} (95% CI {self.ci_low:.2f}-{self.ci_high:.2f}) over {self.n} {unit}"


def detect_format(source: str) -> Format:
    """The format of a human-labelled source, from its first row; `hf:` datasets are hh-rlhf."""
    if str(source).startswith(HF_PREFIX):
        return "hh-rlhf"
    first = next(json_rows(str(source)), None)
    if first is None:
        raise CaiError(f"{source}: no rows")
    return _row_format(source, *first)


def label_accuracy(
    human_source: str,
    constitution: Constitution,
    model_ref: str,
    limit: int | None,
    config: FeedbackConfig,
    backend: GenerationBackend | None = None,
) -> AccuracyReport:
    """The feedback labeller's agreement with the first `limit` human labels of `human_source`.

    See the module docstring for the two formats, what agreement means, the baselines and the
    position bias. Raises `CaiError` naming the source and row for a file in neither format, for
    a constitution or K the labeller cannot use, and for `config.cot` on multiple-choice items
    that have no answer texts.
    """
    if limit is not None and limit < 1:
        raise CaiError(f"limit: must be at least 1, got {limit}")
    check_constitution(constitution, config)
    kind = detect_format(human_source)
    questions = read_multiple_choice(human_source, limit) if kind == "multiple-choice" else []
    as_published = bool(questions) and not all(q.pair is not None for q in questions)
    if as_published and config.cot:
        raise CaiError(
            f"{human_source}: chain of thought needs pairwise items (text_correct and text_incorrect); these are "
            "scored as published"
        )
    model = backend or load_backend(model_ref, config.backend, batch_size=config.batch_size, engine=config.engine)
    common = {
        "source": str(human_source),
        "format": kind,
        "model_ref": model_ref,
        "constitution_ref": constitution.ref,
        "constitution_sha256": constitution.sha256,
        **position_baselines(questions),
    }
    if as_published:
        agreed = _score_multiple_choice(
            model, few_shot_messages(constitution, cot=False), questions, config.shard_size
        )
        return _report(common, "as published", [1.0 if a else 0.0 for a in agreed], {}, None, None)
    pairs = [q.pair for q in questions] if questions else read_human_preferences(human_source, limit)
    labeller = FeedbackLabeller(model, constitution, model_ref, config)
    return labeller_report(labeller, pairs, common)


def labeller_report(labeller: FeedbackLabeller, pairs: Sequence[Preference], common: dict) -> AccuracyReport:
    """The agreement of `labeller` with human `pairs` (answer A: the human's choice), its position
    bias and its mean P(human's choice better); `common` holds the report's source fields."""
    labels = _label_human_pairs(labeller, list(pairs), labeller.config.shard_size)
    p_human = [label.label for label in labels]
    # P(first-shown answer better): p_a_first as asked, and 1 - p_a_second from the swapped question.
    first_shown = [(s.p_a_first + 1.0 - s.p_a_second) / 2.0 for label in labels for s in label.scores]
    outcomes = [hard_outcome(p) for p in p_human]
    bias = sum(first_shown) / len(first_shown) - 0.5
    return _report(
        common, "labeller", outcomes, labeller.config.identity(), bias, sum(p_human) / len(p_human)
    )


def _report(
    common: dict, scoring: str, outcomes: list[float], config: dict, bias: float | None, mean_p: float | None
) -> AccuracyReport:
    a = agreement(outcomes)
    return AccuracyReport(
        **common,
        scoring=scoring,
        n=a.n,
        agreed=a.agreed,
        agreement=a.rate,
        ci_low=a.ci_low,
        ci_high=a.ci_high,
        position_bias=bias,
        mean_p_human_choice=mean_p,
        config=config,
    )


def position_baselines(questions: Sequence[MultipleChoiceRow]) -> dict[str, float]:
    """The accuracies of always answering (A) and always answering (B), as the items were published."""
    if not questions:
        return {}
    return {
        f"always_{letter.lower()}_baseline": sum(
            f"({letter})" in [c.strip() for c in q.corrects] for q in questions
        )
        / len(questions)
        for letter in ("A", "B")
    }


def read_multiple_choice(source: str, limit: int | None = None) -> list[MultipleChoiceRow]:
    """The first `limit` multiple-choice rows of `source`; a row out of format is a `CaiError` naming it."""
    rows = []
    for where, row in json_rows(str(source)):
        if _row_format(source, where, row) != "multiple-choice":
            raise CaiError(f"{source}: {where}: an hh-rlhf row in a multiple-choice file")
        rows.append(_multiple_choice_row(source, where, row))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise CaiError(f"{source}: no multiple-choice rows")
    return rows


def human_pairs(source: str, limit: int | None = None) -> list[Preference]:
    """The first `limit` human comparisons of `source` as pairs (answer A: the human's choice), from
    hh-rlhf rows or from multiple-choice rows that carry both compared conversations; a
    multiple-choice row without them is a `CaiError` naming it."""
    if detect_format(source) == "hh-rlhf":
        return read_human_preferences(source, limit)
    rows = read_multiple_choice(source, limit)
    missing = [number for number, row in enumerate(rows, start=1) if row.pair is None]
    if missing:
        raise CaiError(
            f"{source}: row {missing[0]}: a multiple-choice item without text_correct and text_incorrect "
            "is not a comparison of two answers"
        )
    return [row.pair for row in rows]


def multiple_choice_agrees(correct_scores: Sequence[float], incorrect_scores: Sequence[float]) -> bool:
    """Whether the best correct option scores strictly higher than every incorrect option."""
    return max(correct_scores) > max(incorrect_scores)


def _label_human_pairs(labeller: FeedbackLabeller, rows: list[Preference], chunk: int) -> list[Preference]:
    """The labeller's label of each human pair (answer A is the human's choice)."""
    from tqdm.auto import tqdm

    labels: list[Preference] = []
    with tqdm(total=len(rows), unit="pair", desc="labelling human pairs") as bar:
        for start in range(0, len(rows), chunk):
            labels += labeller.label(rows[start : start + chunk])
            bar.update(len(rows[start : start + chunk]))
    return labels


def _score_multiple_choice(
    model: GenerationBackend, prefix: list, rows: list[MultipleChoiceRow], chunk: int
) -> list[bool]:
    """Whether the model answers each question correctly (see `multiple_choice_agrees`)."""
    from tqdm.auto import tqdm

    agreed: list[bool] = []
    with tqdm(total=len(rows), unit="question", desc="multiple-choice questions") as bar:
        for start in range(0, len(rows), chunk):
            batch = rows[start : start + chunk]
            contexts = [[{"role": "user", "content": row.prompt.strip()}] for row in batch]
            options = [[o.strip() for o in row.corrects + row.incorrects] for row in batch]
            scores = model.score_options(contexts, options, shared_prefix=prefix or None)
            for row, row_scores in zip(batch, scores):
                n_correct = len(row.corrects)
                agreed.append(multiple_choice_agrees(row_scores[:n_correct], row_scores[n_correct:]))
            bar.update(len(batch))
    return agreed


def _row_format(source: str, where: str, row: object) -> Format:
    if isinstance(row, dict) and all(field in row for field in HH_FIELDS):
        return "hh-rlhf"
    if isinstance(row, dict) and all(field in row for field in MC_FIELDS):
        return "multiple-choice"
    found = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise CaiError(
        f"{source}: {where}: neither an hh-rlhf row (fields chosen, rejected) nor a multiple-choice row "
        f"(fields prompt, corrects, incorrects); found {found}"
    )


def _multiple_choice_row(source: str, where: str, row: dict) -> MultipleChoiceRow:
    def problem() -> str | None:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            return "field 'prompt' must be a non-empty string"
        for field in ("corrects", "incorrects"):
            options = row[field]
            if not isinstance(options, list) or not options:
                return f"field '{field}' must be a non-empty list of option strings"
            if not all(isinstance(o, str) and o.strip() for o in options):
                return f"field '{field}' holds an option that is not a non-empty string"
        return None

    error = problem()
    if error:
        raise CaiError(f"{source}: {where}: {error}")
    pair = None
    if isinstance(row.get("text_correct"), str) and isinstance(row.get("text_incorrect"), str):
        try:
            pair = human_preference(split_hh_pair(row["text_correct"], row["text_incorrect"]))
        except (RowError, UnusableRow) as err:
            raise CaiError(f"{source}: {where}: text_correct/text_incorrect: {err}") from None
    return MultipleChoiceRow(
        prompt=row["prompt"], corrects=row["corrects"], incorrects=row["incorrects"], pair=pair
    )
