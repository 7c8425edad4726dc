"""Resumable, sharded JSONL output for the long stages (generation, labelling).

A stage's output is a prefix in the artifact store holding `part-00000.jsonl`, `part-00001.jsonl`,
... and `_inputs.json`, a fingerprint of what produced it. Each shard is written create-only
(`if_absent`): the first writer of a shard wins and the shard never changes afterwards, so two
pods working on one output (a retry racing a slow original) cannot interleave rows. After a crash
or a pod eviction a rerun skips the shards that exist and redoes only the rest; because the work
is split into shards deterministically and row ids derive from content, the rerun yields exactly
the rows an uninterrupted run would. `_SUCCESS.json` (written last) marks the dataset finished:
it is the dataset's manifest, with each shard's size and sha256, the row count and the sha256 of
all rows. Readers check every shard against it, and every key it lists must be a relative path
inside the dataset's prefix (a manifest is data others can write: `../other-dataset/part-0.jsonl`
or an absolute key is refused, naming it, before anything is read).

An output prefix that already holds results of *different* inputs is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from cai_lib.core.errors import CaiError
from cai_lib.core.names import INPUTS, SUCCESS, canonical_sha256
from cai_lib.core.store import ArtifactStore, confined, parse_jsonl_lines, verify_file
from cai_lib.core.text import decoded_lines

MERGED_PART_ROWS = 10_000  # rows per part of a merged dataset
In = TypeVar("In")
Out = TypeVar("Out", bound=BaseModel)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.jsonl"


def is_shard(key: str) -> bool:
    return key.startswith("part-") and key.endswith(".jsonl") and "/" not in key


class ShardedOutput:
    """A JSONL dataset under `uri`, written shard by shard and resumable."""

    def __init__(self, uri: str, inputs: dict):
        self.store = ArtifactStore.open(uri)
        self.inputs = inputs
        self.fingerprint = canonical_sha256(inputs)

    @property
    def uri(self) -> str:
        return self.store.uri

    def claim(self) -> None:
        """Record the inputs, or refuse if the prefix holds output of other inputs."""
        if not self.store.exists(INPUTS) and self.store.list(""):
            raise CaiError(
                f"{self.uri}: is not empty and was not written by this stage; choose another --out"
            )
        self.store.write_json(
            INPUTS,
            {"fingerprint": self.fingerprint, "inputs": self.inputs, "command": resume_command()},
            if_absent=True,
        )
        recorded = self.store.read_json(INPUTS)
        if recorded.get("fingerprint") != self.fingerprint:
            raise CaiError(
                f"{self.uri}: already holds results from different inputs; choose another --out or delete it"
            )

    def done(self, index: int) -> bool:
        return self.store.exists(shard_name(index))

    def run(
        self,
        items: Sequence[In],
        shard_size: int,
        process: Callable[[Sequence[In]], list[Out]],
        on_shard: Callable[[int], None] | None = None,
    ) -> int:
        """Process `items` in shards of `shard_size`, skipping finished shards; returns rows written.

        `process` turns one shard of inputs into its output records (it batches internally).
        `on_shard(n_items)` is called after each shard, done or skipped, for progress bars.
        """
        if shard_size < 1:
            raise CaiError(f"shard size must be >= 1, got {shard_size}")
        self.claim()
        starts = range(0, len(items), shard_size)
        for index, start in enumerate(starts):
            chunk = items[start : start + shard_size]
            if not self.done(index):
                self.store.write_jsonl(shard_name(index), process(chunk), if_absent=True)
            if on_shard:
                on_shard(len(chunk))
        return self.finish(len(starts))

    def finish(self, shards: int) -> int:
        """Write the success marker (the dataset's manifest) once all `shards` shards exist;
        returns the row count."""
        written = set(self.shard_keys())
        missing = [shard_name(i) for i in range(shards) if shard_name(i) not in written]
        if missing:
            raise CaiError(
                f"{self.uri}: shards {', '.join(missing)} are missing; rerun the stage to write them"
            )
        digest, rows, files = hashlib.sha256(), 0, {}
        for key in self.shard_keys():
            with self.store.local_copy(key) as path, open(path, "rb") as handle:
                size, shard_digest = 0, hashlib.sha256()
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
                    shard_digest.update(block)
                    rows += block.count(b"\n")
                    size += len(block)
            files[key] = {"bytes": size, "sha256": shard_digest.hexdigest()}
        summary = {"rows": rows, "sha256": digest.hexdigest(), "shards": len(files), "files": files}
        self.store.write_json(SUCCESS, summary, if_absent=True)
        return rows

    def shard_keys(self) -> list[str]:
        return [k for k in self.store.list("") if is_shard(k)]


def manifest_files(store: ArtifactStore, summary: dict) -> dict | None:
    """The `files` of a finished dataset's manifest, each key checked to lie inside the dataset's
    prefix (`CaiError` naming the first that does not); None for a manifest of an earlier release
    that lists no files."""
    files = summary.get("files") if isinstance(summary, dict) else None
    where = store.uri_of(SUCCESS)
    if files is None:
        return None
    if not isinstance(files, dict):
        raise CaiError(f"{where}: 'files' is not a mapping of shard keys; not a dataset manifest")
    for key in files:
        confined(key, where)
    return files


def read_dataset(uri: str, model: type[Out]) -> Iterator[Out]:
    """Records of a dataset: a sharded prefix (must be finished; each shard is checked against its
    manifest entry before any of its rows is returned) or a single JSONL object/file."""
    store = ArtifactStore.open(uri)
    if store.exists(SUCCESS):
        files = manifest_files(store, store.read_json(SUCCESS))
        keys = sorted(files) if files is not None else sorted(k for k in store.list("") if is_shard(k))
        for key in keys:
            with store.local_copy(key) as path:
                if files is not None:
                    verify_file(path, files[key], store.uri_of(key))
                with open(path, "rb") as handle:
                    yield from parse_jsonl_lines(
                        decoded_lines(handle, store.uri_of(key)), model, store.uri_of(key)
                    )
        return
    if store.exists(INPUTS) or any(is_shard(k) for k in store.list("")):
        raise incomplete(uri, store)
    parent, _, name = uri.rstrip("/").rpartition("/")
    yield from ArtifactStore.open(parent).read_jsonl(name, model)


def dataset_summary(uri: str) -> dict:
    """Row count, sha256 and per-shard manifest of a finished sharded dataset (its keys checked
    to lie inside the dataset's prefix)."""
    store = ArtifactStore.open(uri)
    if not store.exists(SUCCESS):
        raise incomplete(uri, store)
    summary = store.read_json(SUCCESS)
    manifest_files(store, summary)
    return summary


def resume_command() -> str | None:
    """The `cai` command line this process runs, which resumes the output it writes; None in a
    pipeline step (the pipeline run resumes it)."""
    if Path(sys.argv[0]).name != "cai":
        return None
    return shlex.join(["cai", *sys.argv[1:]])


def incomplete(uri: str, store: ArtifactStore) -> CaiError:
    """The error for a dataset whose writer stopped before it finished (no success marker)."""
    shards = sum(is_shard(k) for k in store.list(""))
    command = store.read_json(INPUTS).get("command") if store.exists(INPUTS) else None
    how = (
        f"run `{command}` again to finish it" if command
        else "rerun the stage that writes it (`cai run` again, or retry the pipeline run)"
    )
    return CaiError(
        f"{uri}: incomplete: its writer stopped after {shards} shard(s), before {SUCCESS}; {how} "
        "(finished shards are kept)"
    )


def _row_order(line: str) -> tuple[str, str]:
    return json.loads(line)["id"], line


def _sorted_copy(store: ArtifactStore, key: str, entry: dict | None, folder: str) -> str:
    """A local copy of shard `key`, checked against its manifest `entry`, with its rows in id order."""
    with store.local_copy(key) as path:
        if entry is not None:
            verify_file(path, entry, store.uri_of(key))
        with open(path, encoding="utf-8") as handle:
            lines = sorted(
                (line if line.endswith("\n") else line + "\n" for line in handle if line.strip()),
                key=_row_order,
            )
    out = os.path.join(folder, f"{len(os.listdir(folder)):06d}.jsonl")
    with open(out, "w", encoding="utf-8") as handle:
        handle.writelines(lines)
    return out


def merge_datasets(uris: Sequence[str], out_uri: str) -> int:
    """Merge finished sharded datasets into one at `out_uri`, with every row in the order of its
    `id`: the merged content depends on the rows alone, not on how a fan-out split them, so a run
    with another shard count makes the same dataset (the same sha256) and reuses everything
    downstream. Each input shard is sorted on its own (one shard in memory at a time) and the
    sorted shards are merged as streams into parts of `MERGED_PART_ROWS` rows.

    Idempotent: rerunning with the same inputs finds the same fingerprint, keeps the parts already
    written and writes the rest.
    """
    parts = [(uri, dataset_summary(uri)) for uri in uris]
    output = ShardedOutput(out_uri, {"merge": [[uri, summary["sha256"]] for uri, summary in parts]})
    output.claim()
    with tempfile.TemporaryDirectory() as folder, ExitStack() as files:
        sorted_dir = os.path.join(folder, "sorted")
        os.mkdir(sorted_dir)
        streams = []
        for uri, summary in parts:
            source, entries = ArtifactStore.open(uri), summary.get("files")
            for key in (
                sorted(entries) if entries is not None else [k for k in source.list("") if is_shard(k)]
            ):
                path = _sorted_copy(source, key, entries[key] if entries is not None else None, sorted_dir)
                streams.append(files.enter_context(open(path, encoding="utf-8")))
        merged = heapq.merge(*streams, key=_row_order)
        index = 0
        while block := list(itertools.islice(merged, MERGED_PART_ROWS)):
            if not output.done(index):
                path = os.path.join(folder, shard_name(index))
                with open(path, "w", encoding="utf-8") as handle:
                    handle.writelines(block)
                output.store.put_file(path, shard_name(index), if_absent=True)
                os.unlink(path)
            index += 1
    return output.finish(index)
