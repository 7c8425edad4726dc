"""Bad input a new user gives the `cai` command is one line on stderr, exit status 2, no traceback
and nothing left behind; valid input that looks unusual (a byte order mark, U+2028 inside a JSON
string) is accepted. Each test runs the real `cai` entry point in its own process, as a user does,
with no server and no model: every one of these is refused before a model would load."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from cai_lib.core.records import Trace
from cai_lib.core.shards import ShardedOutput, read_dataset

REPO = Path(__file__).resolve().parents[1]
CONSTITUTION = (REPO / "constitutions" / "harmless" / "1.0.0.yaml").read_text(encoding="utf-8")
# A byte that is never UTF-8 (0xff), placed after some valid text so the offset is not 0.
NOT_UTF8 = b'{"prompt": "caf\xff"}\n'
BOM = "\ufeff".encode()


class Done(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path


@pytest.fixture
def cai(work, monkeypatch, capfd):
    """Run `cai ARGS` through its console entry point (`cai_lib.cli.main`, what the installed
    command calls) in `work`, with a home of its own (no kubeconfig, an empty model cache) and
    only the environment variables given."""
    from cai_lib.cli import main

    def run(*args: str, **env: str) -> Done:
        with monkeypatch.context() as scope:
            for key in list(os.environ):
                if key.startswith(("CAI_", "AWS_", "KUBE")) or key == "MLFLOW_TRACKING_URI":
                    scope.delenv(key)
            for key, value in {"HOME": str(work / "home"), "CAI_CACHE_DIR": str(work / "cache"), **env}.items():
                scope.setenv(key, value)
            scope.setattr(sys, "argv", ["cai", *args])
            scope.chdir(work)
            capfd.readouterr()
            try:
                main()
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            out, err = capfd.readouterr()
        return Done(code, out, err)

    return run


def one_line_error(done: Done, *fragments: str) -> str:
    """The error line, after checking the exit status, that it is the only line and holds `fragments`."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def stage_critique_revise(*extra: str) -> list[str]:
    """`cai stage critique_revise` on the shipped prompts with a policy that is never loaded."""
    return [
        "stage", "critique_revise", "--prompts", "builtin:red_team", "--constitution", "harmless@1.0.0",
        "--policy", "never-loaded", "--limit", "1", *extra,
    ]  # fmt: skip


# -- files that are not UTF-8 -------------------------------------------------------------------------


def test_a_constitution_that_is_not_utf8_is_named_with_the_byte_offset(cai, work):
    path = work / "c.yaml"
    data = b"name: x\nversion: 1.0.0\ncritique_revision: []\n# caf\xe9\n"
    path.write_bytes(data)

    one_line_error(
        cai("constitution", "validate", str(path)), f"{path}: not UTF-8 text (byte 50 is 0xe9)"
    )


def test_a_paper_format_import_file_that_is_not_utf8_writes_no_constitution(cai, work):
    critiques = work / "CritiqueRevisionInstructions.json"
    data = b'{"harmful0": {"prompt": ["\xff"]}}'
    critiques.write_bytes(data)

    done = cai(
        "constitution", "import", "--critiques", str(critiques), "--name", "paper", "--version", "1.0.0",
        "--out", str(work / "out"),
    )  # fmt: skip

    one_line_error(done, f"{critiques}: not UTF-8 text (byte 26 is 0xff)")
    assert not (work / "out").exists()


def test_a_chat_template_that_is_not_utf8_is_refused_before_any_output(cai, work):
    template = work / "template.jinja"
    data = b"{% for m in messages %}\x80{% endfor %}"
    template.write_bytes(data)

    done = cai(*stage_critique_revise("--chat-template", str(template), "--out", str(work / "out")))

    one_line_error(done, f"{template}: not UTF-8 text (byte 23 is 0x80)")
    assert not (work / "out").exists()


def test_a_prompt_file_that_is_not_utf8_is_named_with_the_byte_offset(cai, work):
    prompts = work / "prompts.jsonl"
    data = b'{"prompt": "fine"}\n' + NOT_UTF8
    prompts.write_bytes(data)

    one_line_error(cai("prompts", "show", str(prompts)), f"{prompts}: not UTF-8 text (byte 34 is 0xff)")


def test_a_run_config_that_is_not_utf8_compiles_nothing(cai, work):
    config = work / "run.yaml"
    data = b"params:\n  run_name: caf\xe9\n"
    config.write_bytes(data)

    done = cai("compile", "--config", str(config), "--out", str(work / "pipeline.yaml"))

    one_line_error(done, f"{config}: not UTF-8 text (byte 23 is 0xe9)")
    assert not (work / "pipeline.yaml").exists()


def test_a_dataset_that_is_not_utf8_is_named_by_file_and_byte_before_labelling(cai, work):
    pairs = work / "pairs.jsonl"
    pairs.write_bytes(NOT_UTF8)

    done = cai(
        "stage", "label", "--pairs", str(pairs), "--constitution", "harmless@1.0.0",
        "--feedback-model", "never-loaded", "--out", str(work / "labels"),
    )  # fmt: skip

    one_line_error(done, f"{pairs}: not UTF-8 text (byte 15 is 0xff)")
    assert not (work / "labels").exists()


# -- valid input that is accepted ------------------------------------------------------------------------


def test_a_constitution_with_a_byte_order_mark_is_valid_and_keeps_its_hash(cai, work):
    plain, marked = work / "plain" / "1.0.0.yaml", work / "marked" / "1.0.0.yaml"
    for path, prefix in ((plain, b""), (marked, BOM)):
        path.parent.mkdir()
        path.write_bytes(prefix + CONSTITUTION.encode())

    hashes = [cai("constitution", "validate", str(path)) for path in (plain, marked)]

    assert [done.returncode for done in hashes] == [0, 0], [done.stderr for done in hashes]
    assert hashes[0].stdout.splitlines()[2] == hashes[1].stdout.splitlines()[2]  # the sha256 line


def test_a_prompt_file_with_a_bom_and_a_line_separator_inside_a_string_keeps_every_row(cai, work):
    prompts = work / "prompts.jsonl"
    rows = ["First line\u2028second line of one prompt", "Another prompt\u2029with a paragraph separator"]
    prompts.write_bytes(BOM + "".join(json.dumps({"prompt": r}, ensure_ascii=False) + "\n" for r in rows).encode())

    done = cai("prompts", "show", str(prompts))

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"2 prompts (2 unique) in {prompts}"


def test_a_dataset_row_with_a_line_separator_inside_a_string_reads_back_whole(tmp_path):
    trace = Trace(id="t1", prompt_id="p1", prompt="a\u2028b", initial_answer="c", final_answer="c", model_ref="m")
    path = tmp_path / "traces.jsonl"
    path.write_bytes(BOM + (trace.model_dump_json() + "\n").encode())

    assert [row.prompt for row in read_dataset(str(path), Trace)] == ["a\u2028b"]


# -- environment settings, endpoints and URIs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("CAI_S3_MAX_ATTEMPTS", "eight", "$CAI_S3_MAX_ATTEMPTS: 'eight': Input should be a valid integer"),
        ("CAI_S3_MAX_ATTEMPTS", "0", "$CAI_S3_MAX_ATTEMPTS: '0': Input should be greater than or equal to 1"),
        ("AWS_ENDPOINT_URL_S3", "minio:9000", "$AWS_ENDPOINT_URL_S3: 'minio:9000' is not an http:// or https:// URL"),
        ("AWS_ENDPOINT_URL", "http://minio:port", "$AWS_ENDPOINT_URL: 'http://minio:port' has a port that is not"),
    ],
)
def test_a_bad_environment_setting_is_named_by_its_variable(cai, work, variable, value, fragment):
    one_line_error(cai("prompts", "show", "s3://bucket/prompts.jsonl", **{variable: value}), fragment)


def test_a_bad_constitution_registry_setting_is_named_by_its_variable(cai, work):
    done = cai("constitution", "show", "harmless@1.0.0", CAI_CONSTITUTION_REGISTRY="s3:/bucket")

    one_line_error(done, "$CAI_CONSTITUTION_REGISTRY: 's3:/bucket': not an S3 URI; write s3://BUCKET/KEY")


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("s3:/bucket/prompts", "'s3:/bucket/prompts': not an S3 URI"),
        ("s3://", "'s3://': names no bucket"),
        ("S3://bucket/prompts", "'S3://bucket/prompts': not an S3 URI"),
        ("s3://my bucket/prompts", "'my bucket' is not a valid S3 bucket name"),
    ],
)
def test_a_malformed_s3_output_is_refused_and_no_local_folder_appears(cai, work, uri, fragment):
    done = cai(*stage_critique_revise("--out", uri))

    one_line_error(done, "--out: ", fragment)
    assert sorted(p.name for p in work.iterdir()) == ["home"]


def test_a_malformed_s3_prompt_source_is_refused(cai, work):
    one_line_error(cai("prompts", "show", "s3:bucket/prompts.jsonl"), "not an S3 URI")
    assert sorted(p.name for p in work.iterdir()) == ["home"]


# -- YAML, ranges and rows -------------------------------------------------------------------------------


def test_a_run_config_with_a_key_given_twice_names_the_key_and_line(cai, work):
    config = work / "run.yaml"
    config.write_text("params:\n  critique_revise:\n    rounds: 1\n    rounds: 2\n")

    done = cai("compile", "--config", str(config), "--out", str(work / "pipeline.yaml"))

    one_line_error(done, f"{config}: line 4, column 5: YAML syntax error: duplicate key 'rounds'")
    assert not (work / "pipeline.yaml").exists()


def test_a_set_value_with_a_key_given_twice_is_refused(cai, work):
    done = cai(
        "compile", "--set", "critique_revise={rounds: 1, rounds: 2}", "--out", str(work / "p.yaml")
    )

    one_line_error(done, "--set 'critique_revise={rounds: 1, rounds: 2}'", "duplicate key 'rounds'")


def test_an_out_of_range_seed_on_the_command_line_names_its_flag(cai, work):
    done = cai(*stage_critique_revise("--seed", "-1", "--out", str(work / "out")))

    one_line_error(done, "--seed: Input should be greater than or equal to 0")
    assert not (work / "out").exists()


def test_an_out_of_range_seed_in_a_run_config_names_its_field(cai, work):
    done = cai("compile", "--set", "train_pm.seed=4294967296", "--out", str(work / "p.yaml"))

    one_line_error(done, "field 'params.train_pm.seed': Input should be less than or equal to 2147483647")


def test_a_chat_message_whose_content_is_not_a_string_is_named_by_file_and_row(cai, work):
    prompts = work / "chat.jsonl"
    rows = [{"prompt": "Fine."}, {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))

    one_line_error(
        cai("prompts", "show", str(prompts)),
        f"{prompts}: line 2: a chat message's 'content' must be a string, got list",
    )


# -- clusters, training processes and interrupted outputs ------------------------------------------------


def test_a_cluster_command_without_a_kubeconfig_says_so(cai, work):
    done = cai("serve", "sync", "cai-harmless-rl-cai", "--namespace", "ml-team")

    one_line_error(done, "no Kubernetes cluster to talk to", "no usable kubeconfig at ~/.kube/config")


def test_multi_process_training_checks_its_data_before_torchrun_starts(cai, work):
    traces = work / "traces.jsonl"
    traces.write_text('{"id": "t1", "prompt": "only an id and a prompt"}\n')

    done = cai(
        "stage", "sft", "--traces", str(traces), "--policy", "never-loaded", "--processes", "2",
        "--out", str(work / "sl-cai"),
    )  # fmt: skip

    # One line from the launcher: no rank started, so none repeats it.
    one_line_error(done, f"{traces}: line 1: field 'prompt_id': Field required")
    assert not (work / "sl-cai").exists()


def test_an_interrupted_dataset_is_named_incomplete_with_the_command_that_resumes_it(cai, work, monkeypatch):
    pairs = work / "pairs"
    command = ["cai", "stage", "sample_pairs", "--prompts", "builtin:red_team", "--policy", "p", "--out", str(pairs)]
    monkeypatch.setattr(sys, "argv", command)
    output = ShardedOutput(str(pairs), {"stage": "sample_pairs"})
    output.claim()  # what the stage does first; it is then killed before any shard is written

    done = cai(
        "stage", "label", "--pairs", str(pairs), "--constitution", "harmless@1.0.0",
        "--feedback-model", "never-loaded", "--out", str(work / "labels"),
    )  # fmt: skip

    one_line_error(
        done,
        f"{pairs}: incomplete: its writer stopped after 0 shard(s), before _SUCCESS.json; "
        f"run `cai stage sample_pairs --prompts builtin:red_team --policy p --out {pairs}` again to finish it",
    )
    assert not (work / "labels").exists()
