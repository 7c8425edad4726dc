"""AI feedback: soft preference labels from a feedback model (Bai et al. 2022, §4.1).

The feedback model is shown a conversation, a comparison principle drawn from the constitution
and the two answers as a multiple-choice question, in the paper's form:

    Consider the following conversation between a human and an assistant:
    [conversation]
    [comparison principle question]
    Options:
    (A) [answer A]
    (B) [answer B]
    The answer is:

No text is generated: the log-probabilities of the two option tokens are read and normalised
(a softmax over the two) into a soft label P(A better). For a chat model the question is the
user turn and the option is read at the start of the assistant turn, as "(A" / "(B": both
options share the "(" token and differ in exactly one token, the letter, which is checked on the
model's tokenizer before any work (an ambiguous split is an error that names the tokens).

As in the paper:

- **ensembling**: each pair is labelled under K principles drawn from the constitution (without
  replacement, seeded by the comparison's content), and the label is the mean over them;
- **order debiasing**: each principle is asked twice, with the answers as (A, B) and as (B, A);
  P(A better) under a principle is the mean of the two orders, so a model that always answers
  "(A)" gives 0.5;
- **few-shot**: the constitution's comparison examples precede the question as chat turns
  (user: question / assistant: "(B)"), encoded once by the backend as a shared prefix. An
  example that asks a held-out principle's question (the evaluation judge's) is left out of the
  labels' prompts and shown to the judge instead (`labeller_examples`);
- **chain of thought** (`cot`): the assistant turn starts with "Let's think step by step:", the
  model writes its reasoning (greedy, up to `max_reasoning_tokens`), then the option is read
  after "Therefore, the answer is: (" and each probability is clamped to [0.4, 0.6], because
  probabilities after a chain of thought are overconfident. The few-shot examples then show
  their reasoning before the answer (examples without reasoning are left out in this mode).

Where it departs: the principle draw is seeded by (seed, prompt, unordered answers), so the same
comparison gets the same principles whichever answer is called A (labels of a pair and of its
swap sum to 1); a chain of thought that already states "Therefore, the answer is" is cut there,
so the option is always read right after our own conclusion; CoT probabilities are stored
clamped, since those are the numbers the label is made of.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cai_lib.core.config import Seed
from cai_lib.core.constitution import ComparisonExample, ComparisonPrinciple, Constitution
from cai_lib.core.conversation import Conversation
from cai_lib.core.errors import CaiError
from cai_lib.core.names import canonical_sha256
from cai_lib.core.records import Preference, PrincipleScore, ResponsePair, stable_id
from cai_lib.core.shards import ShardedOutput
from cai_lib.core.transcripts import parse_transcript, render_transcript
from cai_lib.engines.generation import (
    ENGINE_SIZING,
    BackendName,
    EngineConfig,
    GenerationBackend,
    SamplingParams,
    check_fits,
    load_backend,
)

log = logging.getLogger(__name__)

INTRO = "Consider the following conversation between a human and an assistant:"
ANSWER_CUE = "The answer is:"
COT_CUE = "Let's think step by step:"
COT_CONCLUSION = "Therefore, the answer is: ("
COT_CLAMP = (0.4, 0.6)
TIE = 1e-9


class FeedbackConfig(BaseModel):
    """Settings of the AI feedback labeller (paper §4.1)."""

    model_config = ConfigDict(extra="forbid")

    principles_per_pair: int = Field(
        default=4,
        ge=1,
        description="K: comparison principles drawn per pair; the label is the mean over them. At most the "
        "number of comparison principles in the constitution.",
    )
    cot: bool = Field(
        default=False,
        description="Chain of thought: the model reasons before the option is read, and probabilities are "
        "clamped to [0.4, 0.6]. Costs one generation per principle and order.",
    )
    seed: Seed = Field(
        default=0, description="Seeds the principle draws; same seed, same principles per pair."
    )
    max_reasoning_tokens: int = Field(
        default=256, ge=1, description="Upper bound on the chain-of-thought tokens per question (cot only)."
    )
    option_labels: tuple[str, str] = Field(
        default=("A", "B"),
        description="The two option letters. Each '(' + label must tokenize as the shared '(' and one distinct "
        "token; change them only for a tokenizer that splits '(A' and '(B' otherwise.",
    )
    batch_size: int = Field(
        default=16,
        ge=1,
        description="Rows per forward pass inside the backend. Does not change the labels, so a run may resume "
        "with another batch size.",
    )
    shard_size: int = Field(
        default=64,
        ge=1,
        description="Pairs per output shard: the unit of resumption. Part of the output's identity: a resumed "
        "run must use the same value.",
    )
    backend: BackendName = Field(default="transformers", description="Backend: transformers or vllm.")
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="vLLM engine sizing (backend vllm only)."
    )
    held_out_principles: list[str] = Field(
        default_factory=list,
        description="Comparison principle ids never drawn for labels. The pipeline puts the evaluation "
        "judge's principles here (unless evaluate.hold_out_judge_principles is off), so the principles "
        "that judge the trained policies are not the ones they were trained on.",
    )
    few_shot_principles: list[str] | None = Field(
        default=None,
        description="Show only the comparison few-shot examples that ask these principles' questions (the "
        "evaluation judge's own). None: every example except those asking a held-out principle's question, so "
        "the text that judges the policies never appears in the prompts their training labels came from.",
    )
    clamp_cot: bool = Field(
        default=True,
        description="With cot, clamp probabilities to [0.4, 0.6] (the paper's setting for training labels, "
        "against overconfident chains of thought). Evaluation turns it off: a clamp there would bound every "
        "win rate to [0.4, 0.6].",
    )

    @field_validator("option_labels")
    @classmethod
    def _labels_differ(cls, labels: tuple[str, str]) -> tuple[str, str]:
        if not all(label.strip() == label and label for label in labels) or labels[0] == labels[1]:
            raise ValueError(f"need two different non-empty labels without spaces, got {labels}")
        return labels

    def identity(self) -> dict:
        """The settings that determine the labels (all but batch_size and the engine's sizing), for
        the output's fingerprint."""
        return self.model_dump(mode="json", exclude={"batch_size": True, "engine": ENGINE_SIZING})


class Comparison(Protocol):
    """What the labeller needs of a row: `ResponsePair` and `Preference` both have it."""

    id: str
    prompt: str
    answer_a: str
    answer_b: str


# -- label maths ---------------------------------------------------------------------------------


def option_probability(logprob_first: float, logprob_second: float) -> float:
    """P(first option) from the two options' log-probabilities: a softmax over the two."""
    difference = logprob_second - logprob_first
    if difference > 0:  # written this way so that a large difference cannot overflow exp
        odds = math.exp(-difference)
        return odds / (1.0 + odds)
    return 1.0 / (1.0 + math.exp(difference))


def unswapped(p_first_option: float) -> float:
    """P(A better) from a question that showed A second: the model's P(first option) is B's."""
    return 1.0 - p_first_option


def order_debiased(p_a_first: float, p_a_second: float) -> float:
    """P(A better) under one principle: the mean over the two orders, so position bias cancels."""
    return (p_a_first + p_a_second) / 2.0


def ensemble(labels: Sequence[float]) -> float:
    """The label of a pair: the mean of its per-principle labels."""
    if not labels:
        raise ValueError("ensemble of no labels")
    return sum(labels) / len(labels)


def clamp(probability: float, low: float = COT_CLAMP[0], high: float = COT_CLAMP[1]) -> float:
    """`probability` limited to [low, high] (the paper's 40-60% for chain-of-thought labels)."""
    return min(high, max(low, probability))


def hard_outcome(label: float) -> float:
    """A soft label as a game's result: 1 when A is preferred, 0 when B is, 0.5 for a tie (within
    1e-9 of 0.5: identical answers, or a labeller whose two orders cancel, give 0.5 up to rounding)."""
    if abs(label - 0.5) < TIE:
        return 0.5
    return 1.0 if label > 0.5 else 0.0


def scoring_of(one_pass: Sequence[bool | None]) -> Literal["one-pass", "per-option"] | None:
    """How a judgement's questions were read, from the backend's `last_one_pass` flags (None: unknown)."""
    if None in one_pass:
        return None
    return "one-pass" if all(one_pass) else "per-option"


def pair_label(scores: Sequence[PrincipleScore]) -> float:
    """P(A better) of a pair from its per-principle, per-order probabilities."""
    return ensemble([order_debiased(s.p_a_first, s.p_a_second) for s in scores])


def option_split_problem(first: Sequence[str], second: Sequence[str]) -> str | None:
    """Why two options tokenized as `first` and `second` cannot be read as one distinct token each
    (a shared prefix, then one token that differs), or None when they can."""
    if not first or not second:
        return "an option has no tokens"
    if len(first) != len(second) or list(first[:-1]) != list(second[:-1]):
        return "they do not split into the same leading tokens plus one last token each"
    if first[-1] == second[-1]:
        return "they end in the same token"
    return None


# -- prompts ---------------------------------------------------------------------------------------


def as_transcript(prompt: str) -> str:
    """`prompt` as an hh-rlhf transcript ("\\n\\nHuman: …"): a bare request becomes one Human turn."""
    if parse_transcript(prompt):
        return prompt
    if prompt.lstrip().startswith(("Human:", "Assistant:")):
        return "\n\n" + prompt.lstrip()
    return render_transcript([{"role": "user", "content": prompt.strip()}])


def conversation_text(prompt: str) -> str:
    """The conversation as the paper shows it to the feedback model: "Human: …\\n\\nAssistant: …"."""
    return render_transcript(parse_transcript(as_transcript(prompt))).lstrip()


def comparison_question(
    prompt: str, question: str, first: str, second: str, labels: Sequence[str] = ("A", "B"), cot: bool = False
) -> str:
    """The paper's multiple-choice question (§4.1). It ends with "The answer is:" unless `cot`,
    where the assistant's step-by-step reasoning follows instead."""
    lines = [
        INTRO,
        "",
        conversation_text(prompt),
        "",
        question.strip(),
        "Options:",
        f"({labels[0]}) {first.strip()}",
        f"({labels[1]}) {second.strip()}",
    ]
    return "\n".join(lines if cot else [*lines, ANSWER_CUE])


def cot_opening(reasoning: str = "") -> str:
    """The assistant's partial reply after which the option letter is read in chain-of-thought mode."""
    return f"{' '.join(filter(None, [COT_CUE, reasoning.strip()]))}\n{COT_CONCLUSION}"


def cut_reasoning(text: str) -> str:
    """Generated reasoning up to (not including) any conclusion the model wrote itself."""
    stem = COT_CONCLUSION.split(":")[0]
    at = text.lower().find(stem.lower())
    return (text if at < 0 else text[:at]).strip()


def example_principle(constitution: Constitution, example: ComparisonExample) -> str | None:
    """The id of the comparison principle whose question `example` asks (spacing aside), or None."""
    asked = " ".join(example.question.split())
    return next((p.id for p in constitution.comparison if " ".join(p.question.split()) == asked), None)


def labeller_examples(constitution: Constitution, config: FeedbackConfig) -> list[ComparisonExample]:
    """The comparison few-shot examples a labeller with `config` is shown: those of
    `config.few_shot_principles` when set, else every one but those of a held-out principle."""
    if config.few_shot_principles is not None:
        return [
            e for e in constitution.few_shot.comparison
            if example_principle(constitution, e) in config.few_shot_principles
        ]  # fmt: skip
    return [
        e for e in constitution.few_shot.comparison
        if example_principle(constitution, e) not in config.held_out_principles
    ]  # fmt: skip


def few_shot_messages(
    constitution: Constitution,
    cot: bool,
    labels: Sequence[str] = ("A", "B"),
    examples: Sequence[ComparisonExample] | None = None,
) -> Conversation:
    """Comparison examples (default: all of the constitution's) as chat turns: the question, then the
    answer "(X)" (with reasoning before it in chain-of-thought mode; examples without reasoning are
    left out)."""
    messages: Conversation = []
    for example in constitution.few_shot.comparison if examples is None else examples:
        if cot and not example.reasoning.strip():
            continue
        letter = labels[0] if example.preferred == "A" else labels[1]
        question = comparison_question(
            example.conversation, example.question, example.answer_a, example.answer_b, labels, cot
        )
        answer = f"{cot_opening(example.reasoning)}{letter})" if cot else f"({letter})"
        messages += [_user(question), _assistant(answer)]
    return messages


def draw_principles(
    principles: Sequence[ComparisonPrinciple], k: int, seed: int, row: Comparison
) -> list[ComparisonPrinciple]:
    """K distinct principles for one comparison, fixed by (seed, prompt, the two answers in either order)."""
    key = stable_id(str(seed), row.prompt, *sorted((row.answer_a, row.answer_b)))
    return random.Random(key).sample(list(principles), k)


# -- the labeller ------------------------------------------------------------------------------------


class FeedbackLabeller:
    """Soft labels for comparisons, by one feedback model under one constitution."""

    def __init__(
        self,
        model: GenerationBackend,
        constitution: Constitution,
        model_ref: str,
        config: FeedbackConfig,
        run_key: str | None = None,
    ):
        check_constitution(constitution, config)
        self.model = model
        self.constitution = constitution
        self.pool = principle_pool(constitution, config)
        self.model_ref = model_ref
        self.config = config
        examples = labeller_examples(constitution, config)
        self.prefix = few_shot_messages(constitution, config.cot, config.option_labels, examples) or None
        # What label ids derive from: the pipeline output's key when given, else the labeller's identity.
        self.run_key = run_key or canonical_sha256(self.identity())
        check_option_tokens(model, self._probe(), self.options(), self.prefix, model_ref)

    def identity(self) -> dict:
        """What determines the labels: the constitution's comparison section (principles and their
        few-shot examples, not the whole document), the model and the settings."""
        return {
            "constitution_section_sha256": self.constitution.section_sha256("comparison"),
            "model_ref": self.model_ref,
            "config": self.config.identity(),
        }

    def options(self) -> list[str]:
        """The option strings whose log-probabilities are read after each context."""
        labels = self.config.option_labels
        return list(labels) if self.config.cot else [f"({label}" for label in labels]

    def _probe(self) -> Conversation:
        """A context of the exact shape the labels are read after (only its ending matters)."""
        labels, cot = self.config.option_labels, self.config.cot
        question = comparison_question(
            "Hello", self.constitution.comparison[0].question, "Hi.", "Hey.", labels, cot
        )
        return self._context(question, "") if self.config.cot else [_user(question)]

    def _context(self, question: str, reasoning: str) -> Conversation:
        return [_user(question), _assistant(cot_opening(reasoning))] if self.config.cot else [_user(question)]

    def questions(self, rows: Sequence[Comparison]) -> tuple[list[str], list[tuple[int, str]]]:
        """The questions that label `rows`: for each row, each drawn principle, the order (A, B) then
        (B, A); with the (row index, principle id) each one belongs to."""
        labels = self.config.option_labels
        questions, keys = [], []
        for index, row in enumerate(rows):
            for principle in draw_principles(
                self.pool, self.config.principles_per_pair, self.config.seed, row
            ):
                for swapped in (False, True):
                    first, second = (row.answer_b, row.answer_a) if swapped else (row.answer_a, row.answer_b)
                    questions.append(
                        comparison_question(
                            row.prompt, principle.question, first, second, labels, self.config.cot
                        )
                    )
                    keys.append((index, principle.id))
        return questions, keys

    def check_fits(self, rows: Sequence[Comparison]) -> None:
        """Refuse, naming the pair, any comparison question longer than the engine's max_model_len."""
        if not getattr(self.model, "max_model_len", None):
            return  # no limit to check against: do not build every question twice
        questions, keys = self.questions(rows)
        check_fits(
            self.model, [(rows[index].id, [_user(q)]) for q, (index, _) in zip(questions, keys)], self.prefix, "label"
        )

    def label(self, rows: Sequence[Comparison]) -> list[Preference]:
        """One `Preference` per row (P(answer_a better) as `label`), all rows batched together."""
        check_rows(rows)
        questions, keys = self.questions(rows)
        probabilities, reasonings = self.first_option_probabilities(questions)
        one_pass = getattr(self.model, "last_one_pass", None)
        if one_pass is None or len(one_pass) != len(questions):
            one_pass = [None] * len(questions)
        scores: list[dict[str, PrincipleScore]] = [{} for _ in rows]
        for k in range(0, len(keys), 2):
            (index, principle_id), p_ab, p_ba = keys[k], probabilities[k], probabilities[k + 1]
            scores[index][principle_id] = PrincipleScore(
                principle_id=principle_id,
                p_a_first=p_ab,
                p_a_second=unswapped(p_ba),
                reasoning=[r for r in (reasonings[k], reasonings[k + 1]) if r is not None],
                scoring=scoring_of(one_pass[k : k + 2]),
            )
        return [self._preference(row, list(row_scores.values())) for row, row_scores in zip(rows, scores)]

    def first_option_probabilities(self, questions: Sequence[str]) -> tuple[list[float], list[str | None]]:
        """P(first option) for each question, and its chain of thought (None without `cot`).

        Without `cot` this is one `score_options` call and no generation; with `cot`, one batched
        greedy `generate` call for the reasoning, then one `score_options` call after it.
        """
        reasonings: list[str | None] = [None] * len(questions)
        if self.config.cot:
            params = SamplingParams(max_new_tokens=self.config.max_reasoning_tokens, temperature=0.0)
            openings = [[_user(q), _assistant(COT_CUE)] for q in questions]
            replies = self.model.generate(openings, params, shared_prefix=self.prefix)
            reasonings = [cut_reasoning(reply) for reply in replies]
        contexts = [self._context(q, r or "") for q, r in zip(questions, reasonings)]
        options = self.options()
        scores = self.model.score_options(contexts, [options] * len(contexts), shared_prefix=self.prefix)
        probabilities = [option_probability(first, second) for first, second in scores]
        if self.config.cot and self.config.clamp_cot:
            probabilities = [clamp(p) for p in probabilities]
        return probabilities, reasonings

    def _preference(self, row: Comparison, scores: list[PrincipleScore]) -> Preference:
        return Preference(
            id=stable_id("ai", self.run_key, row.id),
            prompt=as_transcript(row.prompt),
            answer_a=row.answer_a,
            answer_b=row.answer_b,
            label=pair_label(scores),
            source="ai",
            principle_ids=[s.principle_id for s in scores],
            scores=scores,
            constitution_ref=self.constitution.ref,
            constitution_sha256=self.constitution.sha256,
            model_ref=self.model_ref,
        )


def principle_pool(constitution: Constitution, config: FeedbackConfig) -> list[ComparisonPrinciple]:
    """The comparison principles labels are drawn from: all but the held-out ones."""
    return [p for p in constitution.comparison if p.id not in config.held_out_principles]


def check_constitution(constitution: Constitution, config: FeedbackConfig) -> None:
    """Refuse a constitution that cannot give K comparison principles per pair (held-out ones aside)."""
    if not constitution.comparison:
        raise CaiError(f"constitution {constitution.ref}: has no comparison principles to label pairs with")
    unknown = sorted(set(config.held_out_principles) - {p.id for p in constitution.comparison})
    if unknown:
        raise CaiError(
            f"held-out principles: {', '.join(unknown)} are not comparison principles of {constitution.ref}"
        )
    available = len(principle_pool(constitution, config))
    if config.principles_per_pair > available:
        held = (
            f" once {len(config.held_out_principles)} are held out for the judge"
            if config.held_out_principles
            else ""
        )
        raise CaiError(
            f"principles per pair: {config.principles_per_pair} is more than the {available} comparison "
            f"principles of {constitution.ref}{held}"
        )


def check_rows(rows: Sequence[Comparison]) -> None:
    """Refuse a row with an empty prompt or answer, naming it (1-based position and id)."""
    for number, row in enumerate(rows, start=1):
        for field in ("prompt", "answer_a", "answer_b"):
            if not str(getattr(row, field, "") or "").strip():
                raise CaiError(f"pair {number} (id {row.id}): field '{field}' is missing or empty")


def check_option_tokens(
    model: GenerationBackend,
    context: Conversation,
    options: Sequence[str],
    prefix: Conversation | None,
    model_ref: str,
) -> None:
    """Refuse options that the model's tokenizer does not split into a shared prefix and one distinct
    token each, right after `context` (how `score_options` will see them)."""
    chat = getattr(model, "chat", None)  # the backends' shared ChatFormat: how score_options tokenizes
    if chat is None:
        log.warning("model %s: backend exposes no chat format; option tokens were not checked", model_ref)
        return
    messages = list(prefix or []) + list(context)
    splits = [chat.tokenizer.convert_ids_to_tokens(chat.option_ids(messages, option)) for option in options]
    problem = option_split_problem(*splits)
    if problem:
        shown = " and ".join(f"'{option}' -> {split}" for option, split in zip(options, splits))
        raise CaiError(
            f"model {model_ref}: the tokenizer splits the option tokens ambiguously ({shown}): {problem}; "
            "choose other option labels"
        )


# -- the stage ----------------------------------------------------------------------------------------


def label_preferences(
    pairs: Sequence[ResponsePair],
    constitution: Constitution,
    model_ref: str,
    out_uri: str,
    config: FeedbackConfig,
    backend: GenerationBackend | None = None,
    output_key: str | None = None,
) -> int:
    """Write one AI `Preference` per pair under `out_uri` (paper §4.1); returns the row count.

    Each record holds the soft label P(answer_a better), the principle ids, the per-principle
    probabilities in both orders and (with `cot`) the reasoning, stamped with the constitution's
    ref and hash and `model_ref`. Sharded and resumable (`cai_lib.core.shards`). Raises `CaiError`,
    writing nothing, for no pairs, a pair with an empty prompt or answer, a constitution without
    comparison principles, K above their number, option tokens the tokenizer splits ambiguously,
    or an `out_uri` that holds results of other inputs.
    """
    from tqdm.auto import tqdm

    pairs = list(pairs)
    if not pairs:
        raise CaiError("label: no pairs given; check the pairs dataset")
    check_rows(pairs)
    check_constitution(constitution, config)
    # Opened before the output is claimed: a model ref that does not resolve leaves nothing behind.
    model = backend or load_backend(model_ref, config.backend, batch_size=config.batch_size, engine=config.engine)
    labeller = FeedbackLabeller(model, constitution, model_ref, config, output_key)
    labeller.check_fits(pairs)
    inputs = (
        {"output_key": output_key}
        if output_key
        else {
            "stage": "label",
            **labeller.identity(),
            "pairs": {"count": len(pairs), "sha256": canonical_sha256({"ids": [p.id for p in pairs]})},
        }
    )
    output = ShardedOutput(out_uri, inputs)
    with tqdm(total=len(pairs), unit="pair", desc="AI feedback labels") as bar:
        return output.run(pairs, config.shard_size, labeller.label, on_shard=bar.update)


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}
