"""Human preference pairs in the hh-rlhf format, and our own preference datasets.

The paper's preference model learns from AI harmlessness labels mixed with human helpfulness
labels (Bai et al. 2022, §4.1); the human pairs come in Anthropic's hh-rlhf format: each row is
`{"chosen": TRANSCRIPT, "rejected": TRANSCRIPT}`, two "\\n\\nHuman: …\\n\\nAssistant: …"
transcripts that share every turn but the last Assistant turn. A row becomes one `Preference`:
the shared turns (rendered as a transcript) are the prompt, the chosen last turn is answer A,
the rejected one answer B, and the label is 1.0 (the human chose A).

Sources are read as in `cai_lib.core.prompts`: a local `.jsonl`/`.jsonl.gz` file, an `s3://` URI of
one, or a Hugging Face dataset `hf:ORG/NAME[/DATA_DIR][:SPLIT]`.

What is an error and what is skipped: a row that is not in the format (not JSON, not an object,
a missing or non-string field, a transcript with no turns or not ending in an Assistant turn)
raises `CaiError` naming the source and line. Rows that are in the format but compare nothing
are real in hh-rlhf and are skipped and counted (logged as a warning): identical answers, an
empty answer (the human preferred silence; a `Preference` needs two answers), and transcripts
that differ before their last turn.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import NamedTuple

from cai_lib.core.conversation import Conversation
from cai_lib.core.errors import CaiError
from cai_lib.core.prompts import HF_PREFIX, RowError, json_rows, parse_hf_source
from cai_lib.core.records import Preference, stable_id
from cai_lib.core.shards import read_dataset
from cai_lib.core.transcripts import parse_transcript, render_transcript

logger = logging.getLogger(__name__)


class HumanPair(NamedTuple):
    """One hh-rlhf row split into the shared conversation and the two compared answers."""

    context: Conversation
    chosen: str
    rejected: str


class UnusableRow(ValueError):
    """A row in the hh-rlhf format that compares nothing; the message is the skip reason."""


def split_hh_pair(chosen: str, rejected: str) -> HumanPair:
    """Split two transcripts into their shared turns and their differing last Assistant turns.

    Raises `RowError` when either transcript is not in the format, and `UnusableRow` when the
    pair compares nothing (identical or empty answers, or turns that differ earlier).
    """
    turns = {"chosen": parse_transcript(chosen), "rejected": parse_transcript(rejected)}
    for field, messages in turns.items():
        if not messages:
            raise RowError(f"field '{field}' holds no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
        if messages[-1]["role"] != "assistant":
            raise RowError(f"field '{field}' does not end with an Assistant turn")
    chosen_turns, rejected_turns = turns["chosen"], turns["rejected"]
    if chosen_turns[:-1] != rejected_turns[:-1]:
        raise UnusableRow("transcripts differ before their last turn")
    answer_chosen, answer_rejected = chosen_turns[-1]["content"], rejected_turns[-1]["content"]
    if not answer_chosen or not answer_rejected:
        raise UnusableRow("an answer is empty")
    if answer_chosen == answer_rejected:
        raise UnusableRow("identical answers")
    return HumanPair(chosen_turns[:-1], answer_chosen, answer_rejected)


def human_preference(pair: HumanPair) -> Preference:
    """The `Preference` for a human pair: answer A is the chosen one, label 1.0."""
    prompt = render_transcript(pair.context)
    return Preference(
        id=stable_id("human", prompt, pair.chosen, pair.rejected),
        prompt=prompt,
        answer_a=pair.chosen,
        answer_b=pair.rejected,
        label=1.0,
        source="human",
    )


def read_human_preferences(source: str, limit: int | None = None) -> list[Preference]:
    """Human preferences from an hh-rlhf source, in file order, at most `limit` of them.

    Skipped rows (see the module docstring) are counted by reason in a logged warning. Raises
    `CaiError` naming the source and line of a row not in the format, or when no pair is usable.
    """
    if limit is not None and limit < 1:
        raise CaiError(f"{source}: limit must be at least 1, got {limit}")
    preferences: list[Preference] = []
    skipped: Counter[str] = Counter()
    for where, row in _rows(str(source)):
        try:
            chosen, rejected = _transcripts(row)
            preferences.append(human_preference(split_hh_pair(chosen, rejected)))
        except RowError as err:
            raise CaiError(f"{source}: {where}: {err}") from None
        except UnusableRow as reason:
            skipped[str(reason)] += 1
        if limit is not None and len(preferences) >= limit:
            break
    if skipped:
        counts = ", ".join(f"{count} with {reason}" for reason, count in sorted(skipped.items()))
        logger.warning("%s: skipped %d rows that compare nothing (%s)", source, sum(skipped.values()), counts)
    if not preferences:
        raise CaiError(f"{source}: no usable hh-rlhf preference pairs")
    return preferences


def read_preferences(uri: str) -> list[Preference]:
    """Our own `Preference` records: a JSONL file/object, or a finished directory of
    `part-*.jsonl` shards (as the labelling stage writes). Raises `CaiError` when it holds none."""
    preferences = list(read_dataset(str(uri), Preference))
    if not preferences:
        raise CaiError(f"{uri}: no preference records")
    return preferences


def _transcripts(row: object) -> tuple[str, str]:
    if not isinstance(row, Mapping):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    missing = [field for field in ("chosen", "rejected") if field not in row]
    if missing:
        raise RowError(f"missing field(s) {', '.join(repr(f) for f in missing)} (fields: {sorted(row)})")
    for field in ("chosen", "rejected"):
        if not isinstance(row[field], str):
            raise RowError(f"field '{field}' must be a transcript string, got {type(row[field]).__name__}")
    return row["chosen"], row["rejected"]


def _rows(source: str) -> Iterator[tuple[str, object]]:
    """(where, row) for each row: 'line N' (1-based) in a file, 'row I' (0-based) in a dataset."""
    if source.startswith(HF_PREFIX):
        yield from dataset_rows(source)
        return
    yield from json_rows(source)


def dataset_rows(source: str) -> Iterator[tuple[str, object]]:
    """(where, row) of each row of a Hugging Face dataset `hf:ORG/NAME[/DATA_DIR][:SPLIT]`, where =
    'row I' (0-based, as in `dataset[i]`); a dataset that cannot be loaded (unknown, offline, no
    such split) is a `CaiError` naming the source."""
    import datasets

    dataset_id, data_dir, split = parse_hf_source(source)
    try:
        dataset = datasets.load_dataset(dataset_id, data_dir=data_dir, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise CaiError(f"{source}: cannot load the dataset ({type(err).__name__}: {err})") from None
    for index, row in enumerate(dataset):
        yield f"row {index}", row
