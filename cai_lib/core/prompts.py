"""Prompt sources for CAI: read, deduplicate, split into train and eval.

The paper (Bai et al. 2022, §3.1) takes red-team prompts from human red-teaming conversations
(Ganguli et al. 2022) and helpfulness prompts from the HH data, and augments the red-team set
with prompts generated few-shot by a pretrained model. We read prompts from the sources below
and do not generate more (a departure: users bring or grow their own sets):

- a JSONL file with a `prompt` field per row (other fields are ignored);
- the hh-rlhf transcript format, `.jsonl` or `.jsonl.gz`: rows `{"chosen", "rejected"}` whose
  prompt is the first Human turn of `chosen`, or red-team attempts whose prompt is the first
  Human turn of `transcript` (hh-rlhf's `red_team_attempts.jsonl.gz` is one JSON array rather
  than JSON lines; a file whose text starts with `[` is read as such an array);
- an `s3://` URI of either file (gzip is detected from the bytes, not the name);
- a Hugging Face dataset, `hf:ORG/NAME[/DATA_DIR][:SPLIT]` (split defaults to `train`;
  DATA_DIR picks a folder of the dataset repository, e.g. hh-rlhf's subsets), for example
  `hf:Anthropic/hh-rlhf/harmless-base:test`. Its `prompt` column is used, else its `chosen`
  transcripts; chat-format values (lists of role/content messages) give their first user turn;
- the project's own sets, `builtin:red_team` and `builtin:helpful`; and two demo sets that the
  quick run reads where a real run reads a public benchmark from the hub (`DEMO_SETS`):
  `builtin:comparisons`, 16 hh-rlhf-format comparisons (a more harmless `chosen` answer, a harmful
  or evasive `rejected` one), and `builtin:refusal_contrast`, 12 prompts in XSTest's format (6 safe
  but scary-sounding, 6 unsafe contrasts). The project wrote them; they are not hh-rlhf or XSTest.

A prompt's id is `stable_id(kind, text)`, so the same prompt has the same id in every run.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path

from cai_lib.core.errors import CaiError
from cai_lib.core.records import PromptKind, PromptRecord, stable_id
from cai_lib.core.store import ArtifactStore, is_s3
from cai_lib.core.text import decode_text, text_lines
from cai_lib.core.transcripts import parse_transcript

BUILTIN_PREFIX = "builtin:"
HF_PREFIX = "hf:"
BUILTIN_SETS = ("red_team", "helpful", "comparisons", "refusal_contrast")
# Built-in sets written for the project to stand in for a public benchmark, so that the demo needs no
# hub; each names the benchmark whose format it has.
DEMO_SETS = {"comparisons": "hh-rlhf", "refusal_contrast": "XSTest"}
# Where a row's prompt is, in order of preference.
PROMPT_FIELDS = ("prompt", "chosen", "transcript")


class RowError(ValueError):
    """A row that holds no usable prompt; the caller adds the source and the row number."""


def read_prompts(source: str, kind: PromptKind = "red_team", limit: int | None = None) -> list[PromptRecord]:
    """Read prompts from `source` (see the module docstring for the formats), in file order.

    Returns at most `limit` records. A malformed row raises `CaiError` naming the source and
    its 1-based line; a source with no prompts raises `CaiError`.
    """
    if limit is not None and limit < 1:
        raise CaiError(f"{source}: limit must be at least 1, got {limit}")
    source = str(source)
    if source.startswith(HF_PREFIX):
        records = _read_hf_dataset(source, kind, limit)
    else:
        records = list(_take(_parse_prompt_rows(source, kind), limit))
    if not records:
        raise CaiError(f"{source}: no prompts found")
    return records


def prompt_of_row(row: Mapping) -> str:
    """The prompt a row holds: its `prompt` field, else the first Human turn of `chosen` or of
    `transcript` (hh-rlhf's red-team attempts).

    A `prompt` may itself be an hh-rlhf transcript or a list of chat messages; then its first
    Human (user) turn is the prompt. Raises `RowError` when the row holds no usable prompt.
    """
    field = next((f for f in PROMPT_FIELDS if f in row), None)
    if field is None:
        raise RowError(
            f"row has none of the fields {', '.join(map(repr, PROMPT_FIELDS))} (fields: {sorted(row)})"
        )
    value = row[field]
    if isinstance(value, list):
        text = _first_user_turn(value)
    elif isinstance(value, str):
        turns = parse_transcript(value)
        if turns:
            text = _first_user_turn(turns)
        elif field != "prompt":
            raise RowError(f"'{field}' transcript has no Human turn")
        else:
            text = value.strip()
    else:
        raise RowError(f"field '{field}' must be a string or a list of messages, got {type(value).__name__}")
    if not text:
        raise RowError(f"field '{field}' holds no Human turn with text")
    return text


def records_from_dataset(
    dataset, kind: PromptKind, source: str, limit: int | None = None
) -> list[PromptRecord]:
    """Map a `datasets.Dataset` to prompt records, using its first column of `PROMPT_FIELDS`.

    Errors name `source` and the dataset row index (0-based, as in `dataset[i]`).
    """
    columns = set(dataset.column_names)
    column = next((f for f in PROMPT_FIELDS if f in columns), None)
    if column is None:
        raise CaiError(
            f"{source}: dataset has none of the columns {', '.join(map(repr, PROMPT_FIELDS))} "
            f"(columns: {sorted(columns)})"
        )

    def records() -> Iterator[PromptRecord]:
        for index, value in enumerate(dataset[column]):
            try:
                text = prompt_of_row({column: value})
            except RowError as err:
                raise CaiError(f"{source}: row {index}: {err}") from None
            yield _record(text, kind, source)

    return list(_take(records(), limit))


def deduplicate(records: Iterable[PromptRecord]) -> list[PromptRecord]:
    """Drop repeated prompts, keeping the first occurrence (compared by `normalise`d text)."""
    seen: set[str] = set()
    unique = []
    for record in records:
        key = normalise(record.prompt)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def normalise(text: str) -> str:
    """The form two prompts share when they count as duplicates: case and spacing ignored."""
    return " ".join(text.split()).casefold()


def split_prompts(
    records: list[PromptRecord], eval_fraction: float, seed: int
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Split into (train, eval), each in input order, deterministically for a given seed.

    Prompts are ranked by a hash of (seed, id) and the first `round(n * eval_fraction)` ids go
    to eval, so a prompt's side does not depend on input order, records with the same id stay
    together, and growing the set moves few prompts. A fraction strictly between 0 and 1 leaves
    both sides non-empty whenever there are at least two distinct prompts.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise CaiError(f"eval_fraction must be within [0, 1], got {eval_fraction}")
    ids = sorted({r.id for r in records}, key=lambda i: stable_id(str(seed), i))
    n_eval = round(len(ids) * eval_fraction)
    if 0.0 < eval_fraction < 1.0 and len(ids) >= 2:
        n_eval = min(max(n_eval, 1), len(ids) - 1)
    eval_ids = set(ids[:n_eval])
    train = [r for r in records if r.id not in eval_ids]
    held_out = [r for r in records if r.id in eval_ids]
    return train, held_out


def demo_set_note(source: str) -> str | None:
    """One line saying that `source` is a demo set written for the project, not the benchmark it
    stands in for, so figures measured on it say nothing about the model; None for other sources."""
    name = source[len(BUILTIN_PREFIX) :] if source.startswith(BUILTIN_PREFIX) else ""
    if name not in DEMO_SETS:
        return None
    return (
        f"{source} is a demo set written for this project, not {DEMO_SETS[name]}: its figures show that the "
        "stage runs and say nothing about the model."
    )


def _record(text: str, kind: PromptKind, source: str) -> PromptRecord:
    return PromptRecord(id=stable_id(kind, text), prompt=text, kind=kind, source=source)


def _first_user_turn(messages: list) -> str:
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise RowError("a chat message must be an object with 'role' and 'content'")
        if not isinstance(message["content"], str):
            raise RowError(f"a chat message's 'content' must be a string, got {type(message['content']).__name__}")
        if message["role"] == "user":
            return message["content"].strip()
    raise RowError("conversation has no Human turn")


def _take(records: Iterator[PromptRecord], limit: int | None) -> Iterator[PromptRecord]:
    for count, record in enumerate(records, start=1):
        yield record
        if limit is not None and count >= limit:
            return


def read_text(source: str) -> str:
    """The decoded text of a local file, an s3:// object or a built-in set; gzip is undone."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_SETS:
            raise CaiError(
                f"{source}: unknown built-in prompt set; choose one of "
                f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_SETS)}"
            )
        return decode_text((resources.files("cai_lib") / "data" / f"{name}.jsonl").read_bytes(), source)
    if is_s3(source):
        if "/" not in source[len("s3://") :].strip("/"):
            raise CaiError(f"{source}: an s3:// prompt source must name an object, s3://BUCKET/KEY")
        parent, _, name = source.rstrip("/").rpartition("/")
    else:
        path = Path(source).expanduser()
        parent, name = str(path.parent), path.name
    data = ArtifactStore.open(parent).read_bytes(name)
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise CaiError(f"{source}: not a readable gzip file ({err})") from None
    return decode_text(data, source)


def _parse_prompt_rows(source: str, kind: PromptKind) -> Iterator[PromptRecord]:
    for where, row in json_rows(source):
        if not isinstance(row, dict):
            raise CaiError(f"{source}: {where}: expected a JSON object, got {type(row).__name__}")
        try:
            yield _record(prompt_of_row(row), kind, source)
        except RowError as err:
            raise CaiError(f"{source}: {where}: {err}") from None


def json_rows(source: str) -> Iterator[tuple[str, object]]:
    """(where, row) of each row of a local or `s3://` file, gzipped or not: its JSON lines, or the
    items of the one JSON array it holds (where = "line N" / "item N", 1-based), for error messages."""
    text = read_text(source)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise CaiError(f"{source}: not a valid JSON array (line {err.lineno}: {err.msg})") from None
        yield from ((f"item {number}", row) for number, row in enumerate(items, start=1))
        return
    for number, line in enumerate(text_lines(text), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise CaiError(f"{source}: line {number}: not valid JSON ({err.msg})") from None


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """Split `hf:ORG/NAME[/DATA_DIR][:SPLIT]` into (dataset id, data_dir or None, split).

    SPLIT is passed to `datasets` as is, so slices such as `test[:500]` work.
    """
    spec, _, split = source[len(HF_PREFIX) :].lstrip("/").partition(":")
    parts = [p for p in spec.split("/") if p]
    if len(parts) < 2:
        raise CaiError(f"{source}: expected hf:ORG/NAME[/DATA_DIR][:SPLIT], e.g. hf:Anthropic/hh-rlhf:test")
    data_dir = "/".join(parts[2:]) or None
    return "/".join(parts[:2]), data_dir, split or "train"


def _read_hf_dataset(source: str, kind: PromptKind, limit: int | None) -> list[PromptRecord]:
    """Load a Hugging Face dataset split (from the hub or the local `datasets` cache)."""
    import datasets

    dataset_id, data_dir, split = parse_hf_source(source)
    try:
        dataset = datasets.load_dataset(dataset_id, data_dir=data_dir, split=split)
    except (OSError, ValueError) as err:  # not found, no network, unknown split: all user-fixable
        raise CaiError(f"{source}: cannot load the dataset ({type(err).__name__}: {err})") from None
    return records_from_dataset(dataset, kind, source, limit)
