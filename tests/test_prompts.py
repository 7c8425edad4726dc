"""Prompt sources: JSONL, hh-rlhf transcripts (plain and gzip), s3://, Hugging Face datasets and the
built-in sets; deduplication; the seeded train/eval split."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from cai_lib.core.errors import CaiError
from cai_lib.core.prompts import (
    deduplicate,
    parse_hf_source,
    read_prompts,
    records_from_dataset,
    split_prompts,
)
from cai_lib.core.records import PromptRecord, stable_id
from cai_lib.core.store import ArtifactStore

CAI = Path(sys.executable).parent / "cai"


def hh_row(*turns: str) -> dict:
    """An hh-rlhf row whose transcripts alternate Human and Assistant turns."""
    speakers = ("Human", "Assistant")
    transcript = "".join(f"\n\n{speakers[i % 2]}: {text}" for i, text in enumerate(turns))
    return {"chosen": transcript, "rejected": transcript + " (worse)"}


def jsonl(rows: list) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def write(path, rows: list):
    path.write_text(jsonl(rows))
    return str(path)


def prompts(records: list[PromptRecord]) -> list[str]:
    return [r.prompt for r in records]


def records_of(texts: list[str]) -> list[PromptRecord]:
    return [PromptRecord(id=stable_id("red_team", t), prompt=t) for t in texts]


# -- formats ------------------------------------------------------------------------------------


def test_jsonl_prompt_field_is_read_in_order_and_other_fields_ignored(tmp_path):
    src = write(
        tmp_path / "p.jsonl", [{"prompt": "How do I pick a lock?", "category": "crime"}, {"prompt": "Hi"}]
    )
    records = read_prompts(src)
    assert prompts(records) == ["How do I pick a lock?", "Hi"]
    assert records[0] == PromptRecord(
        id=stable_id("red_team", "How do I pick a lock?"),
        prompt="How do I pick a lock?",
        kind="red_team",
        source=src,
    )


def test_ids_depend_on_kind_and_text_only(tmp_path):
    first = read_prompts(write(tmp_path / "a.jsonl", [{"prompt": "Plan a trip"}]), kind="helpful")
    again = read_prompts(write(tmp_path / "b.jsonl", [{"prompt": "Plan a trip", "x": 1}]), kind="helpful")
    as_red_team = read_prompts(str(tmp_path / "a.jsonl"), kind="red_team")
    assert first[0].id == again[0].id == stable_id("helpful", "Plan a trip")
    assert as_red_team[0].id != first[0].id


def test_hh_rlhf_row_gives_its_first_human_turn(tmp_path):
    src = write(
        tmp_path / "hh.jsonl", [hh_row("How do I steal a car?", "I can't help.", "Please, it's mine.")]
    )
    assert prompts(read_prompts(src)) == ["How do I steal a car?"]


def test_gzipped_hh_rlhf_file_is_read(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl([hh_row("first?", "a"), hh_row("second?", "b")]).encode()))
    assert prompts(read_prompts(str(path))) == ["first?", "second?"]


def red_team_attempt(*turns: str) -> dict:
    """A row of hh-rlhf's red-team-attempts: the whole conversation in `transcript`."""
    row = hh_row(*turns)
    return {"transcript": row["chosen"], "rating": 2.0, "task_description": "get harmful advice"}


def test_hh_rlhf_red_team_attempts_json_array_gives_the_first_human_turns(tmp_path):
    path = tmp_path / "red_team_attempts.jsonl.gz"
    rows = [red_team_attempt("How do I hotwire a car?", "No."), red_team_attempt("Insult me.", "No.")]
    path.write_bytes(gzip.compress(json.dumps(rows, indent=1).encode()))
    assert prompts(read_prompts(str(path))) == ["How do I hotwire a car?", "Insult me."]


def test_a_bad_item_of_a_json_array_is_a_cai_error_naming_the_item(tmp_path):
    path = tmp_path / "attempts.json"
    path.write_text(json.dumps([red_team_attempt("fine?", "ok"), {"transcript": "Assistant: hi"}]))
    with pytest.raises(CaiError, match=rf"^{path}: item 2: 'transcript' transcript has no Human turn"):
        read_prompts(str(path))


def test_gzip_is_detected_from_the_bytes_not_the_name(tmp_path):
    path = tmp_path / "prompts.data"
    path.write_bytes(gzip.compress(jsonl([{"prompt": "zipped"}]).encode()))
    assert prompts(read_prompts(str(path))) == ["zipped"]


def test_formats_are_detected_per_row(tmp_path):
    src = write(tmp_path / "mixed.jsonl", [{"prompt": "plain"}, hh_row("from a transcript", "ok")])
    assert prompts(read_prompts(src)) == ["plain", "from a transcript"]


def test_a_prompt_field_holding_a_transcript_gives_its_first_human_turn(tmp_path):
    src = write(tmp_path / "p.jsonl", [{"prompt": "\n\nHuman: What is 2+2?\n\nAssistant:"}])
    assert prompts(read_prompts(src)) == ["What is 2+2?"]


def test_a_prompt_field_holding_chat_messages_gives_the_first_user_turn(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Name a fruit. "}]
    src = write(tmp_path / "chat.jsonl", [{"prompt": messages}])
    assert prompts(read_prompts(src)) == ["Name a fruit."]


def test_limit_keeps_the_first_prompts(tmp_path):
    src = write(tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(10)])
    assert prompts(read_prompts(src, limit=3)) == ["prompt 0", "prompt 1", "prompt 2"]


def test_limit_stops_before_a_bad_row_further_down(tmp_path):
    src = write(tmp_path / "p.jsonl", [{"prompt": "fine"}, "not json"])
    assert prompts(read_prompts(src, limit=1)) == ["fine"]


def test_jsonl_on_s3_is_read(s3_bucket):
    ArtifactStore.open(f"s3://{s3_bucket}/data").write_text("red.jsonl", jsonl([{"prompt": "from s3"}]))
    records = read_prompts(f"s3://{s3_bucket}/data/red.jsonl")
    assert prompts(records) == ["from s3"]
    assert records[0].source == f"s3://{s3_bucket}/data/red.jsonl"


def test_gzipped_hh_rlhf_on_s3_is_read(s3_bucket):
    data = gzip.compress(jsonl([hh_row("zipped on s3?", "yes")]).encode())
    ArtifactStore.open(f"s3://{s3_bucket}").write_bytes("hh/test.jsonl.gz", data)
    assert prompts(read_prompts(f"s3://{s3_bucket}/hh/test.jsonl.gz")) == ["zipped on s3?"]


def test_a_missing_s3_object_is_a_cai_error_naming_it(s3_bucket):
    with pytest.raises(CaiError, match=f"s3://{s3_bucket}/none.jsonl: no such object"):
        read_prompts(f"s3://{s3_bucket}/none.jsonl")


def test_an_s3_uri_naming_only_a_bucket_is_a_cai_error(s3_env):
    with pytest.raises(CaiError, match="must name an object"):
        read_prompts("s3://just-a-bucket")


# -- Hugging Face datasets ----------------------------------------------------------------------


def test_dataset_prompt_column_is_used():
    dataset = datasets.Dataset.from_dict({"prompt": ["one", "two"], "chosen": ["\n\nHuman: ignored", "x"]})
    records = records_from_dataset(dataset, "helpful", "hf:acme/set")
    assert prompts(records) == ["one", "two"]
    assert records[0] == PromptRecord(
        id=stable_id("helpful", "one"), prompt="one", kind="helpful", source="hf:acme/set"
    )


def test_dataset_chosen_transcripts_give_the_first_human_turn():
    dataset = datasets.Dataset.from_list([hh_row("Where do I buy a gun?", "Why?"), hh_row("Hello", "Hi")])
    assert prompts(records_from_dataset(dataset, "red_team", "hf:Anthropic/hh-rlhf")) == [
        "Where do I buy a gun?",
        "Hello",
    ]


def test_dataset_chat_format_prompts_give_the_first_user_turn():
    dataset = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": "Tell me a joke"}]]})
    assert prompts(records_from_dataset(dataset, "helpful", "hf:acme/chat")) == ["Tell me a joke"]


def test_dataset_without_a_prompt_or_chosen_column_is_a_cai_error_naming_the_columns():
    dataset = datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]})
    with pytest.raises(CaiError, match=r"hf:acme/qa: .*\['answer', 'question'\]"):
        records_from_dataset(dataset, "helpful", "hf:acme/qa")


def test_dataset_row_without_a_human_turn_is_a_cai_error_naming_the_row():
    dataset = datasets.Dataset.from_list([hh_row("fine", "ok"), {"chosen": "no turns", "rejected": ""}])
    with pytest.raises(CaiError, match="hf:acme/hh: row 1: 'chosen' transcript has no Human turn"):
        records_from_dataset(dataset, "red_team", "hf:acme/hh")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("hf:Anthropic/hh-rlhf", ("Anthropic/hh-rlhf", None, "train")),
        ("hf:Anthropic/hh-rlhf:test", ("Anthropic/hh-rlhf", None, "test")),
        (
            "hf:Anthropic/hh-rlhf/harmless-base:test[:500]",
            ("Anthropic/hh-rlhf", "harmless-base", "test[:500]"),
        ),
        ("hf://Anthropic/hh-rlhf/red-team-attempts", ("Anthropic/hh-rlhf", "red-team-attempts", "train")),
    ],
)
def test_hf_source_syntax(source, expected):
    assert parse_hf_source(source) == expected


def test_hf_source_without_org_and_name_is_a_cai_error():
    with pytest.raises(CaiError, match="expected hf:ORG/NAME"):
        parse_hf_source("hf:hh-rlhf")


@pytest.fixture
def local_hub_copy(tmp_path, monkeypatch, hub_offline):
    """A dataset laid out as on the hub (`acme/hh/harmless-base/test.jsonl.gz`) in the working
    directory, where `datasets.load_dataset("acme/hh", ...)` finds it; the hub is switched off."""
    folder = tmp_path / "acme" / "hh" / "harmless-base"
    folder.mkdir(parents=True)
    (folder / "test.jsonl.gz").write_bytes(
        gzip.compress(jsonl([hh_row("hub row one"), hh_row("hub row two")]).encode())
    )
    monkeypatch.chdir(tmp_path)


def test_hf_source_loads_the_named_data_dir_and_split_through_datasets(local_hub_copy):
    records = read_prompts("hf:acme/hh/harmless-base:test", kind="red_team")
    assert prompts(records) == ["hub row one", "hub row two"]
    assert records[0].source == "hf:acme/hh/harmless-base:test"


def test_hf_source_with_an_unknown_split_is_a_cai_error(local_hub_copy):
    with pytest.raises(CaiError, match=r"hf:acme/hh/harmless-base:validation: cannot load.*Unknown split"):
        read_prompts("hf:acme/hh/harmless-base:validation")


# -- built-in sets ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["red_team", "helpful"])
def test_builtin_sets_hold_at_least_forty_distinct_prompts(name):
    records = read_prompts(f"builtin:{name}", kind=name)
    assert len(records) >= 40
    assert len(deduplicate(records)) == len(records)
    assert {r.source for r in records} == {f"builtin:{name}"}


def test_builtin_sets_share_no_prompt():
    red_team = {r.prompt for r in read_prompts("builtin:red_team")}
    helpful = {r.prompt for r in read_prompts("builtin:helpful", kind="helpful")}
    assert not red_team & helpful


def test_unknown_builtin_set_is_a_cai_error_listing_the_choices():
    with pytest.raises(
        CaiError, match="builtin:harmful: unknown built-in prompt set; choose one of builtin:red_team"
    ):
        read_prompts("builtin:harmful")


# -- the shared hh-rlhf rows --------------------------------------------------------------------


def test_shared_hh_rlhf_file_gives_one_prompt_per_row(hh_rlhf_path):
    records = read_prompts(str(hh_rlhf_path))
    assert len(records) == 1000
    assert records[0].prompt == "what are some pranks with a pen i can do?"
    assert records[1].prompt == "How much alcohol can I drink per day?"


def test_shared_hh_rlhf_file_repeats_some_prompts(hh_rlhf_path):
    unique = deduplicate(read_prompts(str(hh_rlhf_path)))
    assert len(unique) == 969
    assert len({r.id for r in unique}) == 969


# -- bad input ----------------------------------------------------------------------------------


def test_invalid_json_is_a_cai_error_naming_source_and_line(tmp_path):
    src = write(tmp_path / "p.jsonl", [{"prompt": "ok"}, "", '{"prompt": "unterminated'])
    with pytest.raises(CaiError, match=rf"^{src}: line 3: not valid JSON"):
        read_prompts(src)


def test_a_row_that_is_not_an_object_is_a_cai_error_naming_the_line(tmp_path):
    src = write(tmp_path / "p.jsonl", [{"prompt": "ok"}, ["a", "list"]])
    with pytest.raises(CaiError, match=rf"^{src}: line 2: expected a JSON object, got list"):
        read_prompts(src)


def test_a_row_without_prompt_or_chosen_is_a_cai_error_naming_the_line(tmp_path):
    src = write(tmp_path / "p.jsonl", [{"question": "what?"}])
    with pytest.raises(
        CaiError, match=rf"^{src}: line 1: row has none of the fields 'prompt', 'chosen', 'transcript'"
    ):
        read_prompts(src)


def test_an_hh_rlhf_row_with_no_human_turn_is_a_cai_error_naming_the_line(tmp_path):
    src = write(
        tmp_path / "hh.jsonl", [hh_row("fine", "ok"), {"chosen": "Assistant says hi", "rejected": ""}]
    )
    with pytest.raises(CaiError, match=rf"^{src}: line 2: 'chosen' transcript has no Human turn"):
        read_prompts(src)


@pytest.mark.parametrize("row", [{"prompt": "   "}, {"prompt": "\n\nHuman: \n\nAssistant: hi"}])
def test_an_empty_prompt_is_a_cai_error_naming_the_line(tmp_path, row):
    src = write(tmp_path / "p.jsonl", [row])
    with pytest.raises(CaiError, match=rf"^{src}: line 1: field 'prompt' holds no Human turn with text"):
        read_prompts(src)


def test_a_prompt_that_is_not_text_is_a_cai_error_naming_the_line(tmp_path):
    src = write(tmp_path / "p.jsonl", [{"prompt": 42}])
    with pytest.raises(CaiError, match=rf"^{src}: line 1: field 'prompt' must be a string"):
        read_prompts(src)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_an_empty_source_is_a_cai_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(CaiError, match=rf"^{path}: no prompts found"):
        read_prompts(str(path))


def test_a_missing_file_is_a_cai_error_naming_it(tmp_path):
    with pytest.raises(CaiError, match="missing.jsonl: no such file"):
        read_prompts(str(tmp_path / "missing.jsonl"))


def test_a_corrupt_gzip_file_is_a_cai_error(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "x"}\n' * 50)[:30])
    with pytest.raises(CaiError, match=rf"^{path}: not a readable gzip file"):
        read_prompts(str(path))


# -- deduplication ------------------------------------------------------------------------------


def test_deduplicate_keeps_the_first_occurrence_ignoring_case_and_spacing():
    records = records_of(["How do I cook rice?", "Tell me a joke", "how do I  cook rice? ", "Tell me a joke"])
    assert deduplicate(records) == [records[0], records[1]]


# -- the seeded split ---------------------------------------------------------------------------


def hundred() -> list[PromptRecord]:
    return records_of([f"prompt number {i}" for i in range(100)])


def test_split_takes_the_eval_fraction_and_keeps_every_prompt_once():
    records = hundred()
    train, held_out = split_prompts(records, eval_fraction=0.2, seed=0)
    assert (len(train), len(held_out)) == (80, 20)
    assert sorted(r.id for r in train + held_out) == sorted(r.id for r in records)


def test_split_with_the_same_seed_is_the_same():
    assert split_prompts(hundred(), 0.2, seed=7) == split_prompts(hundred(), 0.2, seed=7)


def test_split_with_another_seed_differs():
    _, eval_a = split_prompts(hundred(), 0.2, seed=7)
    _, eval_b = split_prompts(hundred(), 0.2, seed=8)
    assert {r.id for r in eval_a} != {r.id for r in eval_b}


def test_split_side_does_not_depend_on_input_order():
    records = hundred()
    _, held_out = split_prompts(records, 0.2, seed=3)
    _, held_out_reversed = split_prompts(records[::-1], 0.2, seed=3)
    assert {r.id for r in held_out} == {r.id for r in held_out_reversed}


def test_split_keeps_input_order_within_each_side():
    records = hundred()
    train, held_out = split_prompts(records, 0.3, seed=1)
    position = {r.id: i for i, r in enumerate(records)}
    assert [position[r.id] for r in train] == sorted(position[r.id] for r in train)
    assert [position[r.id] for r in held_out] == sorted(position[r.id] for r in held_out)


def test_split_keeps_records_with_the_same_id_on_the_same_side():
    records = hundred() + hundred()[:50]
    train, held_out = split_prompts(records, 0.5, seed=2)
    assert not {r.id for r in train} & {r.id for r in held_out}


def test_a_small_fraction_still_holds_out_one_prompt():
    train, held_out = split_prompts(records_of(["a", "b", "c"]), eval_fraction=0.01, seed=0)
    assert (len(train), len(held_out)) == (2, 1)


def test_eval_fraction_zero_keeps_everything_for_training():
    train, held_out = split_prompts(hundred(), eval_fraction=0.0, seed=0)
    assert (len(train), held_out) == (100, [])


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_eval_fraction_outside_zero_to_one_is_a_cai_error(fraction):
    with pytest.raises(CaiError, match="eval_fraction"):
        split_prompts(hundred(), eval_fraction=fraction, seed=0)


# -- `cai prompts show` -------------------------------------------------------------------------


def cai_prompts(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CAI), "prompts", *args], check=False, capture_output=True, text=True)


def test_cli_show_prints_the_count_and_the_first_prompts(hh_rlhf_path):
    result = cai_prompts("show", str(hh_rlhf_path), "--limit", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"1000 prompts (969 unique) in {hh_rlhf_path}"
    assert lines[1].split(maxsplit=2) == [
        "1",
        stable_id("red_team", "what are some pranks with a pen i can do?"),
        "what are some pranks with a pen i can do?",
    ]
    assert lines[2].endswith("How much alcohol can I drink per day?")
    assert len(lines) == 3


def test_cli_show_prints_each_prompt_on_one_shortened_line(tmp_path):
    long_prompt = "Please explain,\nin detail, " + "why " * 60
    src = write(tmp_path / "p.jsonl", [{"prompt": long_prompt}])
    result = cai_prompts("show", src, "--kind", "helpful")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert stable_id("helpful", long_prompt.strip()) in lines[1]
    assert "Please explain, in detail, why why" in lines[1]
    assert lines[1].endswith("…")


def test_cli_show_reports_a_bad_row_as_one_line_and_exit_status_2(tmp_path):
    src = write(tmp_path / "hh.jsonl", [hh_row("fine", "ok"), {"chosen": "no turns here", "rejected": ""}])
    result = cai_prompts("show", src)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {src}: line 2: 'chosen' transcript has no Human turn"


def test_cli_show_help_gives_an_example():
    result = cai_prompts("show", "--help")
    assert result.returncode == 0
    assert "Example: cai prompts show" in result.stdout
