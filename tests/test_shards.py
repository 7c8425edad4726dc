"""Merging a fan-out's shard datasets: the merged rows are in id order, so the merged dataset is
the same (same sha256) whatever the shard count, and a shard that differs from its manifest is
refused."""

from __future__ import annotations

import json
import re

import pytest

from cai_lib.core.errors import CaiError
from cai_lib.core.records import PromptRecord
from cai_lib.core.shards import ShardedOutput, dataset_summary, merge_datasets, read_dataset, shard_name

ROWS = [PromptRecord(id=f"{i * 7919 % 101:03d}", prompt=f"prompt {i}") for i in range(10)]


def sharded(root, shards: int, part_rows: int = 2) -> list[str]:
    """ROWS split as a fan-out of `shards` tasks splits them, each task writing parts of `part_rows`."""
    uris = []
    for shard in range(shards):
        uri = str(root / f"{shards}-{shard}")
        ShardedOutput(uri, {"shard": shard}).run(ROWS[shard::shards], part_rows, list)
        uris.append(uri)
    return uris


def test_a_merge_of_three_shards_equals_a_merge_of_one(tmp_path):
    merge_datasets(sharded(tmp_path, 3), str(tmp_path / "three"))
    merge_datasets(sharded(tmp_path, 1), str(tmp_path / "one"))
    three, one = dataset_summary(str(tmp_path / "three")), dataset_summary(str(tmp_path / "one"))
    assert (three["rows"], three["sha256"]) == (one["rows"], one["sha256"]) == (10, one["sha256"])


def test_merged_rows_are_in_id_order(tmp_path):
    merge_datasets(sharded(tmp_path, 3), str(tmp_path / "merged"))
    ids = [row.id for row in read_dataset(str(tmp_path / "merged"), PromptRecord)]
    assert ids == sorted(r.id for r in ROWS)


def test_a_merge_rerun_keeps_the_parts_it_wrote(tmp_path):
    uris = sharded(tmp_path, 2)
    out = tmp_path / "merged"
    merge_datasets(uris, str(out))
    before = (out / shard_name(0)).stat().st_ino
    (out / "_SUCCESS.json").unlink()
    assert merge_datasets(uris, str(out)) == 10
    assert (out / shard_name(0)).stat().st_ino == before


def test_a_shard_changed_after_its_manifest_was_written_is_refused(tmp_path):
    uris = sharded(tmp_path, 2)
    with open(f"{uris[1]}/{shard_name(0)}", "a", encoding="utf-8") as handle:
        handle.write(ROWS[0].model_dump_json() + "\n")
    with pytest.raises(CaiError, match=f"{uris[1]}/{shard_name(0)}"):
        merge_datasets(uris, str(tmp_path / "merged"))


@pytest.mark.parametrize("key", ["../other/part-00000.jsonl", "/etc/passwd", "a/../../x.jsonl", "./part-00000.jsonl"])
def test_a_dataset_manifest_naming_a_key_outside_its_prefix_is_refused_naming_it(tmp_path, key):
    (uri,) = sharded(tmp_path, 1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "part-00000.jsonl").write_text(ROWS[0].model_dump_json() + "\n")
    manifest = json.loads((tmp_path / "1-0" / "_SUCCESS.json").read_text())
    manifest["files"][key] = {"bytes": 1, "sha256": "0" * 64}
    (tmp_path / "1-0" / "_SUCCESS.json").write_text(json.dumps(manifest))
    for read in (lambda: list(read_dataset(uri, PromptRecord)), lambda: dataset_summary(uri)):
        with pytest.raises(CaiError, match=f"_SUCCESS.json: manifest entry {re.escape(repr(key))} is not a relative path"):
            read()
