"""The preference model (PM) of RL-CAI, trained on soft labels (Bai et al. 2022, §4.1).

The PM is a causal LM with a one-logit sequence-classification head: it reads a conversation
ending in an assistant answer and returns a scalar score r, read at the last token. The paper
trains it on the feedback model's *soft* labels: for a pair (A, B) with p = P(A is better),

    loss = −[p·log σ(r_A − r_B) + (1 − p)·log σ(r_B − r_A)],

the cross-entropy between p and the Bradley-Terry probability σ(r_A − r_B). At p ∈ {0, 1} it is
the usual hard-label loss; otherwise it is minimised at r_A − r_B = logit(p), so an unsure label
asks for a small margin instead of a confident one. AI harmlessness labels are mixed with human
(helpfulness) pairs at a configurable ratio, and the PM's accuracy is reported on held-out human
pairs, as the paper does.

Departures from the paper: the PM is fine-tuned directly from the policy's own base checkpoint
(the paper first does "preference model pre-training" on large public comparison sets); and
human pairs enter with hard labels (1.0), since that is what hh-rlhf records.

Why not TRL's `RewardTrainer`: its loss is −log σ(r_chosen − r_rejected − margin) on hard pairs,
and no margin expresses a soft label (p = 0.5 must pull r_A − r_B to 0, not past a margin).
Extending it would mean replacing its loss and its collator while still calling the two answers
"chosen" and "rejected". The plain `transformers.Trainer` takes a loss function
(`compute_loss_func`) and a collator as arguments, so the small trainer here is those two
functions on top of it, and keeps the Trainer's accelerate integration (multi-GPU, mixed
precision, gradient accumulation, schedules, logging) without subclassing anything.
"""

from __future__ import annotations

import math
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cai_lib.core.config import Seed
from cai_lib.core.conversation import Conversation
from cai_lib.core.errors import CaiError
from cai_lib.core.names import METRICS_FILE
from cai_lib.core.prompts import split_prompts
from cai_lib.core.records import Preference
from cai_lib.core.store import checkpoint_location
from cai_lib.core.transcripts import parse_transcript, render_transcript
from cai_lib.engines.attention import use_grouped_sdpa
from cai_lib.engines.launch import TrainingJob
from cai_lib.engines.training import TrainingSetup, WorldReport, inference_dtype


class PreferenceModelConfig(TrainingSetup):
    """How to train the preference model."""

    learning_rate: float = Field(
        default=1e-5, gt=0.0, description="Peak AdamW learning rate (linear decay to 0)."
    )
    epochs: float = Field(default=1.0, gt=0.0, description="Passes over the mixed training set.")
    batch_size: int = Field(
        default=8, ge=1, description="Preference pairs per device and step (each pair is two sequences)."
    )
    max_length: int = Field(
        default=1024,
        ge=8,
        description="Tokens per conversation; longer ones keep their end (the answer is read "
        "at the last token), so the start of a long conversation is cut.",
    )
    human_fraction: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Share of human-labelled pairs in the training set. The larger "
        "source is subsampled (seeded) so the mix has this share; with no human pairs given, the AI pairs are "
        "used alone.",
    )
    eval_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Share of each source (human, AI) held out for evaluation before "
        "mixing; accuracy on the held-out human pairs is the PM's headline metric.",
    )
    seed: Seed = Field(
        default=0, description="Seed for the split, the mix, the head's initialisation and shuffling."
    )
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: float = Field(
        default=0,
        ge=0,
        description="Linear learning-rate warmup: a number of steps, or a fraction in [0, 1) of all.",
    )
    eval_batch_size: int = Field(default=16, ge=1, description="Sequences per forward pass when scoring.")
    labels: Literal["soft", "hard"] = Field(
        default="soft",
        description="soft: train on the labeller's probabilities, as the paper does; hard: on the side each "
        "label favours (pairs at exactly 0.5 left out), the ablation of the soft labels.",
    )
    calibration_bins: int = Field(
        default=5,
        ge=2,
        le=20,
        description="Equal-width bins of predicted P(A better) for the calibration curve on the held-out human "
        "pairs.",
    )


class CalibrationBin(BaseModel):
    """Held-out human pairs whose predicted P(A better) fell in [low, high): how often A was the human's choice."""

    low: float
    high: float
    predicted: float = Field(description="Mean predicted P(A better), σ(r_A − r_B), in the bin.")
    observed: float = Field(description="How often answer A was the human's choice in the bin.")
    n: int
    ci_low: float = Field(default=0.0, description="Lower end of the Wilson 95% interval of `observed`.")
    ci_high: float = Field(default=1.0, description="Upper end of the Wilson 95% interval of `observed`.")


class CalibrationPair(BaseModel):
    """One held-out human pair of the calibration curve: where the human's choice was shown, and
    what the PM predicted."""

    id: str = Field(description="The pair's id.")
    chosen_shown_as: Literal["A", "B"] = Field(description="The position the seeded draw gave the human's choice.")
    predicted: float = Field(description="σ(r_A − r_B) with the answers in those positions.")


class Calibration(BaseModel):
    """The PM's calibration against human choices (the paper's Fig. 9): the binned curve and the
    positions each pair was shown in, so the draw can be checked."""

    source: str = Field(description="Which held-out human pairs were used.")
    seed: int = Field(description="Seeds the per-pair draw of positions.")
    bins: list[CalibrationBin] = Field(default_factory=list)
    pairs: list[CalibrationPair] = Field(default_factory=list)


class PreferenceModelMetrics(BaseModel):
    """What training produced: data counts, held-out accuracy and the loss curve."""

    model_config = ConfigDict(extra="forbid")

    base_model_ref: str
    checkpoint_uri: str
    train_pairs: int
    train_ai_pairs: int
    train_human_pairs: int
    eval_human_pairs: int
    eval_ai_pairs: int
    human_accuracy: float | None = Field(
        description="Fraction of held-out human pairs where r(chosen) > r(rejected); None without human pairs."
    )
    ai_accuracy: float | None = Field(
        description="Agreement of sign(r_A − r_B) with the held-out AI labels (ties at 0.5 left out); None "
        "without such pairs."
    )
    loss_curve: list[float] = Field(description="Training loss at each optimiser step.")
    calibration: Calibration | None = Field(
        default=None,
        description="Predicted P(A better) against how often A was the human's choice, on the held-out human "
        "pairs with positions drawn per pair (Fig. 9); None without human pairs (AI labels are not choices).",
    )
    world: WorldReport = Field(description="Processes, sharding, precision and what each rank trained on.")
    config: PreferenceModelConfig

    @field_validator("calibration", mode="before")
    @classmethod
    def _no_undrawn_calibration(cls, value: object) -> object:
        return drop_undrawn_calibration(value)


def drop_undrawn_calibration(value: object) -> object:
    """A calibration stored before positions were drawn (a bare list of bins, every human pair shown
    with its choice as A and AI labels counted as observations) measured nothing: read as None."""
    return None if isinstance(value, list) else value


def soft_preference_loss(r_a, r_b, p):
    """Mean of −[p·log σ(r_A−r_B) + (1−p)·log σ(r_B−r_A)] over pairs (torch tensors of one shape)."""
    return soft_preference_losses(r_a, r_b, p).mean()


def soft_preference_losses(r_a, r_b, p):
    """The per-pair soft-label loss, computed with `logsigmoid` so large margins stay finite."""
    import torch.nn.functional as F

    margin = r_a - r_b
    return -(p * F.logsigmoid(margin) + (1.0 - p) * F.logsigmoid(-margin))


def preference_accuracy(r_a: Sequence[float], r_b: Sequence[float], labels: Sequence[float]) -> float | None:
    """Fraction of pairs whose score order agrees with the label (A better when label > 0.5).

    Ties in the label (exactly 0.5) say nothing and are left out; a tie in the scores counts as
    wrong. None when no pair has a preference.
    """
    decided = [(a, b, label) for a, b, label in zip(r_a, r_b, labels, strict=True) if label != 0.5]
    if not decided:
        return None
    return sum((a > b) if label > 0.5 else (b > a) for a, b, label in decided) / len(decided)


def mix_preferences(
    ai: Sequence[Preference], human: Sequence[Preference], human_fraction: float, seed: int
) -> list[Preference]:
    """The largest training set with `human_fraction` human pairs, shuffled (seeded).

    All of the scarcer source is kept and the other is subsampled to the ratio. With one
    source empty, the other is used alone, unless the fraction asks for the missing one only.
    """
    if not ai and not human:
        raise CaiError("no preference pairs to train on")
    if not human and human_fraction == 1.0:
        raise CaiError("human_fraction is 1.0 but no human preference pairs were given (--human)")
    if not ai and human_fraction == 0.0:
        raise CaiError("human_fraction is 0.0 but no AI preference pairs were given (--ai)")
    rng = random.Random(seed)
    if not human or not ai:
        chosen_ai, chosen_human = list(ai), list(human)
    elif human_fraction in (0.0, 1.0):
        chosen_ai, chosen_human = (list(ai), []) if human_fraction == 0.0 else ([], list(human))
    else:
        wanted_human = round(len(ai) * human_fraction / (1.0 - human_fraction))
        if wanted_human <= len(human):
            chosen_ai, chosen_human = list(ai), rng.sample(list(human), wanted_human)
        else:
            wanted_ai = round(len(human) * (1.0 - human_fraction) / human_fraction)
            chosen_ai, chosen_human = rng.sample(list(ai), wanted_ai), list(human)
    mixed = chosen_ai + chosen_human
    rng.shuffle(mixed)
    return mixed


def conversation_of(prompt: str) -> Conversation:
    """Chat messages for a prompt: its turns when it is an hh-rlhf transcript, else one user turn."""
    return parse_transcript(prompt) or [{"role": "user", "content": prompt.strip()}]


def reward_text(tokenizer, prompt: str, answer: str) -> str:
    """The text the PM reads for `answer` to `prompt`: the chat template applied to the prompt's
    turns plus the answer, or the hh-rlhf transcript for a tokenizer without a template."""
    return conversation_text(tokenizer, conversation_of(prompt) + [{"role": "assistant", "content": answer}])


def conversation_text(tokenizer, conversation: Conversation) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    return render_transcript(conversation)


class RewardScorer:
    """A loaded preference model: load once, then score many (prompt, answer) pairs."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int = 1024):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    @classmethod
    def load(
        cls, reward_model_ref: str, batch_size: int = 16, max_length: int = 1024, device: str | None = None
    ) -> RewardScorer:
        """Open a PM checkpoint. Raises `CaiError` when it is not a one-logit sequence classifier."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = _reward_checkpoint(reward_model_ref)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=inference_dtype(device), use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        _agree_on_pad_token(model, tokenizer)
        model = model.to(device)
        use_grouped_sdpa(model)
        return cls(model, tokenizer, batch_size, max_length)

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        """The PM's score of each answer to its prompt (higher is preferred)."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        texts = [reward_text(self.tokenizer, p, a) for p, a in zip(prompts, answers)]
        return self.score_rendered(texts)

    def score_conversations(self, conversations: Sequence[Conversation]) -> list[float]:
        """The score of each conversation's last (assistant) turn."""
        return self.score_rendered([conversation_text(self.tokenizer, c) for c in conversations])

    def score_rendered(self, texts: Sequence[str]) -> list[float]:
        """The score of each text already rendered for the PM (see `reward_text`)."""
        import torch

        ids = [encode(self.tokenizer, text, self.max_length) for text in texts]
        scores: list[float] = []
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(ids), self.batch_size):
                input_ids, mask = pad_right(ids[start : start + self.batch_size], self.tokenizer.pad_token_id)
                logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
                scores.extend(logits[:, 0].float().tolist())
        return scores


def score_texts(
    reward_model_ref: str, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16
) -> list[float]:
    """Load the PM at `reward_model_ref` and score each answer to its prompt."""
    return RewardScorer.load(reward_model_ref, batch_size=batch_size).score(prompts, answers)


def encode(tokenizer, text: str, max_length: int) -> list[int]:
    """Token ids of `text`, keeping the last `max_length` (the score is read at the end)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:]


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int):
    """(input_ids, attention_mask) tensors, right-padded to the longest sequence."""
    import torch

    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return input_ids, mask


def train_preference_model(
    ai_prefs: Sequence[Preference],
    human_prefs: Sequence[Preference],
    base_model_ref: str,
    out_uri: str,
    config: PreferenceModelConfig | None = None,
) -> PreferenceModelMetrics | None:
    """Train a PM on AI labels mixed with human pairs and save it at `out_uri`.

    Each source is split into train and held-out pairs (by id, seeded), the training parts are
    mixed at `config.human_fraction`, and a one-logit head on `base_model_ref` is trained with
    the soft-label loss (on labels rounded to 0/1 with `config.labels` "hard"). The metrics hold
    the held-out accuracies and the calibration curve on the held-out human pairs (`human_calibration`),
    measured on the saved checkpoint. The checkpoint (safetensors + tokenizer) and `metrics.json` are written together
    to `out_uri`, which must hold nothing yet. Returns the metrics on the main process (rank 0),
    None on the other ranks of a multi-process run.
    """
    from cai_lib.engines.training import (
        current_world,
        device_of,
        log_world,
        record_rows,
        save_trained,
        world_report,
    )

    config = config or PreferenceModelConfig()
    store, key = checkpoint_location(out_uri)
    train_ai, eval_ai = split_prompts(list(ai_prefs), config.eval_fraction, config.seed)
    train_human, eval_human = split_prompts(list(human_prefs), config.eval_fraction, config.seed)
    train_set = mix_preferences(train_ai, train_human, config.human_fraction, config.seed)
    if config.labels == "hard":
        train_set = hardened(train_set)

    model, tokenizer = _load_base(base_model_ref, config.seed)
    with tempfile.TemporaryDirectory(prefix="cai-pm-") as tmp:
        trainer = _trainer(model, tokenizer, train_set, config, Path(tmp) / "trainer")
        rows = record_rows(trainer)
        trainer.train()
        world = world_report(trainer, rows, config.batch_size, config.gradient_accumulation_steps)
        checkpoint = Path(tmp) / "checkpoint"
        save_trained(trainer, tokenizer, checkpoint)
        if not current_world().is_main:
            return None
        log_world(world)
        device = device_of(current_world(), config.use_cpu)
        scorer = RewardScorer.load(str(checkpoint), config.eval_batch_size, config.max_length, device)
        metrics = PreferenceModelMetrics(
            base_model_ref=base_model_ref,
            checkpoint_uri=store.uri_of(key),
            train_pairs=len(train_set),
            train_ai_pairs=sum(p.source == "ai" for p in train_set),
            train_human_pairs=sum(p.source == "human" for p in train_set),
            eval_human_pairs=len(eval_human),
            eval_ai_pairs=len(eval_ai),
            human_accuracy=_accuracy(scorer, eval_human),
            ai_accuracy=_accuracy(scorer, eval_ai),
            loss_curve=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            calibration=_calibration(scorer, eval_human, config),
            world=world,
            config=config,
        )
        (checkpoint / METRICS_FILE).write_text(metrics.model_dump_json(indent=2) + "\n")
        store.put_dir(checkpoint, key)
    return metrics


def _trainer(model, tokenizer, train_set: Sequence[Preference], config: PreferenceModelConfig, scratch: Path):
    """A `Trainer` with the soft-label loss over the encoded pairs of `train_set`."""
    from transformers import Trainer, TrainingArguments

    from cai_lib.engines.training import common_arguments

    examples = [
        {
            "a_ids": encode(tokenizer, reward_text(tokenizer, p.prompt, p.answer_a), config.max_length),
            "b_ids": encode(tokenizer, reward_text(tokenizer, p.prompt, p.answer_b), config.max_length),
            "labels": p.label,
        }
        for p in train_set
    ]
    args = TrainingArguments(
        output_dir=str(scratch),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        seed=config.seed,
        remove_unused_columns=False,
        **common_arguments(config),
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=lambda batch: _collate_pairs(batch, tokenizer.pad_token_id),
        compute_loss_func=_trainer_loss,
    )


def _collate_pairs(batch: list[dict], pad_token_id: int) -> dict:
    """A batch of pairs as one batch of sequences: all A answers first, then all B answers."""
    import torch

    input_ids, mask = pad_right([e["a_ids"] for e in batch] + [e["b_ids"] for e in batch], pad_token_id)
    labels = torch.tensor([e["labels"] for e in batch], dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _trainer_loss(outputs, labels, num_items_in_batch=None):
    """The soft-label loss for `Trainer`: summed over pairs and divided by the pairs in the whole
    accumulated batch (`num_items_in_batch`), so gradient accumulation weights pairs equally."""
    r_a, r_b = outputs.logits[:, 0].float().chunk(2)
    losses = soft_preference_losses(r_a, r_b, labels)
    return losses.sum() / num_items_in_batch if num_items_in_batch is not None else losses.mean()


def hardened(pairs: Sequence[Preference]) -> list[Preference]:
    """The pairs with each label rounded to the side it favours; exact ties are left out."""
    return [p.model_copy(update={"label": 1.0 if p.label > 0.5 else 0.0}) for p in pairs if p.label != 0.5]


def calibration_curve(
    predicted: Sequence[float], observed: Sequence[float], bins: int
) -> list[CalibrationBin]:
    """Predicted probabilities grouped into `bins` equal-width bins (the last one closed at 1),
    each with its mean prediction, the share of its pairs whose A was chosen (`observed` is 1 or 0
    per pair) and that share's Wilson 95% interval; empty bins are left out."""
    from cai_lib.method.evaluation.elo import wilson_interval

    curve = []
    for index in range(bins):
        low, high = index / bins, (index + 1) / bins
        inside = [
            (p, o) for p, o in zip(predicted, observed) if low <= p < high or (index == bins - 1 and p == 1.0)
        ]
        if inside:
            chosen = sum(o for _, o in inside)
            ci_low, ci_high = wilson_interval(chosen, len(inside))
            curve.append(
                CalibrationBin(
                    low=low,
                    high=high,
                    predicted=sum(p for p, _ in inside) / len(inside),
                    observed=chosen / len(inside),
                    n=len(inside),
                    ci_low=ci_low,
                    ci_high=ci_high,
                )
            )
    return curve


def bradley_terry(r_a: float, r_b: float) -> float:
    """P(A better) = σ(r_A − r_B), without overflow."""
    margin = r_a - r_b
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    odds = math.exp(margin)
    return odds / (1.0 + odds)


def chosen_shown_first(seed: int, pair_id: str) -> bool:
    """The seeded draw of one pair's positions: whether the human's choice is shown as A."""
    return random.Random(f"{seed}:calibration:{pair_id}").random() < 0.5


def human_calibration(
    ids: Sequence[str],
    r_chosen: Sequence[float],
    r_rejected: Sequence[float],
    source: str,
    seed: int,
    bins: int,
) -> Calibration:
    """The PM's calibration against human choices (the paper's Fig. 9) on held-out human pairs, given
    the PM's score of each pair's chosen and rejected answer. Each pair is shown with the human's
    choice as A or as B by a seeded draw per pair (recorded); the predicted P(A better),
    σ(r_A − r_B), is binned against how often A was the human's choice. Without the draw every
    pair would show the choice as A and every bin would observe 1."""
    pairs = []
    for pair_id, chosen, rejected in zip(ids, r_chosen, r_rejected, strict=True):
        first = chosen_shown_first(seed, pair_id)
        r_a, r_b = (chosen, rejected) if first else (rejected, chosen)
        pairs.append(
            CalibrationPair(id=pair_id, chosen_shown_as="A" if first else "B", predicted=bradley_terry(r_a, r_b))
        )
    observed = [1.0 if p.chosen_shown_as == "A" else 0.0 for p in pairs]
    curve = calibration_curve([p.predicted for p in pairs], observed, bins)
    return Calibration(source=source, seed=seed, bins=curve, pairs=pairs)


def _calibration(scorer: RewardScorer, pairs: Sequence[Preference], config: PreferenceModelConfig) -> Calibration | None:
    """Calibration on the held-out human pairs."""
    if not pairs:
        return None
    prompts = [p.prompt for p in pairs]
    r_chosen = scorer.score(prompts, [p.chosen for p in pairs])
    r_rejected = scorer.score(prompts, [p.rejected for p in pairs])
    return human_calibration(
        [p.id for p in pairs], r_chosen, r_rejected, "held-out human pairs", config.seed, config.calibration_bins
    )


def _accuracy(scorer: RewardScorer, pairs: Sequence[Preference]) -> float | None:
    if not pairs:
        return None
    prompts = [p.prompt for p in pairs]
    r_a = scorer.score(prompts, [p.answer_a for p in pairs])
    r_b = scorer.score(prompts, [p.answer_b for p in pairs])
    return preference_accuracy(r_a, r_b, [p.label for p in pairs])


def _load_base(base_model_ref: str, seed: int):
    """The base checkpoint with a fresh one-logit head (seeded), in float32, and its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    from cai_lib.engines.models import resolve_model

    path = resolve_model(base_model_ref)
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=torch.float32, use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    _agree_on_pad_token(model, tokenizer)
    use_grouped_sdpa(model)
    return model, tokenizer


def _agree_on_pad_token(model, tokenizer) -> None:
    """A sequence classifier finds each sequence's last token by the pad id, so the model and
    tokenizer must share one (the EOS token when the tokenizer has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


def _reward_checkpoint(reward_model_ref: str) -> Path:
    """The local checkpoint of a PM; refuses one that is not a one-logit sequence classifier."""
    from transformers import AutoConfig

    from cai_lib.engines.models import resolve_model

    path = resolve_model(reward_model_ref)
    config = AutoConfig.from_pretrained(str(path))
    architectures = config.architectures or []
    if (
        not any(name.endswith("ForSequenceClassification") for name in architectures)
        or config.num_labels != 1
    ):
        kind = ", ".join(architectures) or "an unnamed architecture"
        raise CaiError(
            f"reward model '{reward_model_ref}': {path} is {kind} with {config.num_labels} label(s), not a "
            "sequence classifier with one output; train one with `cai stage train-pm`"
        )
    return path


# The launcher's interface (`cai_lib.engines.launch.TRAINERS`): how a `TrainingJob` of this stage trains.
JOB_CONFIG = PreferenceModelConfig


def run_job(job: TrainingJob, config: PreferenceModelConfig) -> PreferenceModelMetrics | None:
    """Train `job` (its datasets read by role) with `config`; the metrics on the main process."""
    return train_preference_model(job.rows("ai", Preference), job.rows("human", Preference), job.model, job.out, config)
