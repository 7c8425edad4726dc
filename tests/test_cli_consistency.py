"""The command line says one thing one way: a stage has one name (either spelling accepted), a
flag means the same in every stage, switches have both forms, help shows defaults and has an
example in every group, the examples and the documented commands run as written, and a dry run
writes nothing.

The examples: every `Example:` line of every command's and group's help, and every `cai` line of
the README's and docs' shell blocks, is parsed by the CLI's own parser (options exist, required
ones are given, values have their types), and every local file it names exists in the repository
or is the `--out` of another documented command. Those that run offline in seconds (constitutions,
prompts, `trainjob render`, `compile`) are also run; the rest need a model, a cluster, S3 or a
network, and are parsed only.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from cai_lib.cli import app
from cai_lib.cli.config_options import config_options
from cai_lib.cli.stage_feedback import RUN_CONFIG_ONLY
from cai_lib.core.errors import CaiError
from cai_lib.core.stage_table import NAMES
from cai_lib.method.feedback import FeedbackConfig
from cai_lib.platform.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]
ROOT = get_command(app)
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Commands that need no model, cluster, S3 or network and finish in seconds: their examples run.
RUNS_OFFLINE = {
    ("constitution", "validate"),
    ("constitution", "list"),
    ("constitution", "show"),
    ("constitution", "diff"),
    ("constitution", "import"),
    ("constitution", "lock"),
    ("prompts", "show"),
    ("trainjob", "render"),
    ("compile",),
}
# Values that name something other than a local file.
NOT_A_FILE = re.compile(r"^(s3://|hf:|builtin:|models:/|https?://|\.$)")
# A Hugging Face model id as a run config's model fields take it (ORG/NAME, no local path prefix).
HUB_ID = re.compile(r"^(?!runs/|\.|/)[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def commands(command=ROOT, path=()):
    """(path, command) of the root, every group and every command."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, (*path, name))


def help_examples() -> list[tuple[str, str]]:
    """(where, command line) of every `Example:` line in every help text."""
    found = []
    for path, command in commands():
        for line in (command.help or "").splitlines():
            if line.strip().startswith("Example: "):
                found.append((f"`cai {' '.join(path)} --help`", line.strip().removeprefix("Example: ")))
    return found


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) of every `cai` line in the shell blocks of the README and docs."""
    found = []
    for document in DOCUMENTS:
        for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", document.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if re.match(r"^(\S+=\S+\s+)*(\.venv/bin/)?cai\s", line.strip()):
                    found.append((document.name, line.strip()))
    return found


def invocations(line: str) -> list[list[str]]:
    """The `cai` argument lists of a shell line: comments, `VAR=value` prefixes and other commands
    joined by `&&` left out."""
    words = shlex.split(line, comments=True)
    runs, current = [], []
    for word in [*words, "&&"]:
        if word == "&&":
            while current and re.match(r"^\w+=", current[0]):
                current.pop(0)
            if current and Path(current[0]).name == "cai":
                runs.append(current[1:])
            current = []
        else:
            current.append(word)
    return runs


def parse(argv: list[str]):
    """(command path, leaf command, its parsed context) as the CLI's parser reads `argv`; a usage
    error raises as it would on the command line."""
    command, context, args, name, path = ROOT, None, list(argv), "cai", []
    while True:
        context = command.make_context(name, args, parent=context)
        if not hasattr(command, "commands"):
            return tuple(path), command, context
        rest = [*getattr(context, "_protected_args", []), *context.args]
        name, command, args = command.resolve_command(context, rest)
        path.append(command.name)


EXAMPLES = help_examples()
DOCUMENTED = documented_commands()
ALL = [(where, argv) for where, line in EXAMPLES + DOCUMENTED for argv in invocations(line)]


def referenced_files(context) -> list[str]:
    """Local files and folders the parsed command reads (its `--out` aside)."""
    names = []
    for name, value in context.params.items():
        if name == "out" or value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            key, _, text = str(item).partition("=") if "=" in str(item) else ("", "", str(item))
            if key.endswith("_model") and HUB_ID.match(text):
                continue  # `--set base_model=ORG/NAME` names a Hugging Face model, not a local folder
            if isinstance(item, (str, Path)) and not NOT_A_FILE.match(text):
                if "/" in text or re.search(r"\.(ya?ml|json|jsonl|gz|jinja)$", text):
                    names.append(text)
    return names


@functools.cache
def redirected() -> frozenset[str]:
    """Files the documents' shell blocks write with a redirection (`kubectl ... > run-config.yaml`)."""
    found = set()
    for document in DOCUMENTS:
        for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", document.read_text(), re.S):
            found.update(re.findall(r"(?<![0-9&>])>\s*([\w./-]+)", block))
    return frozenset(found)


def outputs() -> frozenset[str]:
    """What the documented commands write: their `--out`s, and files a shell block redirects into."""
    made = (parse(argv)[2].params.get("out") for _, argv in ALL)
    return frozenset(str(out).rstrip("/") for out in made if out) | redirected()


# -- examples ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [p for p, c in commands() if hasattr(c, "commands")], ids=" ".join)
def test_every_group_has_an_example_in_its_help(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "250"})

    assert result.exit_code == 0, result.output
    assert f"Example: cai {' '.join(path)}".replace("  ", " ") in result.output


@pytest.mark.parametrize("path", [p for p, c in commands() if not hasattr(c, "commands")], ids=" ".join)
def test_every_command_has_an_example_of_itself_in_its_help(path):
    own = [line for where, line in EXAMPLES if where == f"`cai {' '.join(path)} --help`"]

    assert any(argv[: len(path)] == list(path) for line in own for argv in invocations(line)), own


@pytest.mark.parametrize(("where", "argv"), ALL, ids=[f"{w}: {' '.join(a)[:60]}" for w, a in ALL])
def test_every_example_and_documented_command_parses(where, argv):
    parse(argv)


@pytest.mark.parametrize(("where", "argv"), ALL, ids=[f"{w}: {' '.join(a)[:60]}" for w, a in ALL])
def test_every_file_an_example_names_exists_or_an_example_makes_it(where, argv):
    made = outputs()
    for name in referenced_files(parse(argv)[2]):
        made_by_one = any(name.rstrip("/") == out or name.startswith(out + "/") for out in made)
        assert (REPO / name).exists() or made_by_one, f"{where}: {' '.join(argv)}: nothing makes {name}"


OFFLINE = [
    (where, argv) for where, argv in ALL if parse(argv)[0] in RUNS_OFFLINE and not any("hf:" in a for a in argv)
]


@pytest.mark.parametrize(("where", "argv"), OFFLINE, ids=[f"{w}: {' '.join(a)[:60]}" for w, a in OFFLINE])
def test_the_examples_that_run_offline_run_as_written(where, argv, tmp_path, monkeypatch):
    # A copy of what the examples read, in a folder of their own: what they write stays there.
    for name in ("pipelines", "tests"):
        (tmp_path / name).symlink_to(REPO / name)
    shutil.copytree(REPO / "constitutions", tmp_path / "constitutions")
    monkeypatch.setenv("CAI_CONSTITUTIONS_DIR", str(tmp_path / "constitutions"))
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(app, argv)

    assert result.exit_code == 0, (where, result.output, result.exception)


# -- one name per stage ----------------------------------------------------------------------------------


def test_every_stage_command_is_named_as_the_stage_table_names_the_stage():
    stage_commands = set(ROOT.commands["stage"].commands)

    assert stage_commands - {"label_accuracy"} <= set(NAMES)


@pytest.mark.parametrize("spelling", ["train_pm", "train-pm"])
def test_a_stage_is_found_by_either_spelling_on_every_command(spelling):
    command = parse(["stage", spelling, "--ai-labels", "l", "--base-model", "m", "--out", "o"])[1]
    rendered = CliRunner().invoke(
        app, ["trainjob", "render", "--stage", spelling, "--config", "pipelines/configs/llama-8b-two-nodes.yaml"]
    )
    config = load_run_config(
        REPO / "pipelines/configs/quick.yaml", [f"{spelling}.epochs=3", f"deploy.resources.{spelling}.memory_request=32Gi"]
    )

    assert command.name == "train_pm"
    assert rendered.exit_code == 0, rendered.output
    assert "outputs/train_pm/KEY/ATTEMPT" in rendered.output
    assert config.params.train_pm.epochs == 3
    assert config.deploy.resources["train_pm"].memory_request == "32Gi"


def test_a_run_config_section_under_its_old_name_is_told_the_new_one(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("params:\n  preference_model:\n    epochs: 2\n")

    with pytest.raises(CaiError, match=r"field 'params.preference_model': renamed 'params.train_pm'"):
        load_run_config(path)


# -- one flag per concept ----------------------------------------------------------------------------------


def options_of(path: tuple[str, ...]) -> set[str]:
    command = ROOT
    for name in path:
        command = command.commands[name]
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


@pytest.mark.parametrize(
    ("stage", "flags"),
    [
        ("critique_revise", {"--policy", "--prompts", "--constitution", "--chat-template"}),
        ("helpful_samples", {"--policy", "--helpful-prompts", "--chat-template"}),
        ("sft", {"--policy", "--traces", "--helpful-samples", "--chat-template"}),
        ("sample_pairs", {"--policy", "--prompts", "--chat-template"}),
        ("label", {"--feedback-model", "--pairs", "--constitution"}),
        ("label_accuracy", {"--feedback-model", "--human", "--constitution"}),
        ("train_pm", {"--base-model", "--ai-labels", "--human"}),
        ("rl", {"--policy", "--reward", "--prompts", "--helpful-prompts", "--ai-labels"}),
        ("evaluate", {"--policy", "--reward", "--prompts", "--helpful-prompts", "--traces", "--feedback-model"}),
    ],
)
def test_each_stage_names_its_inputs_with_the_shared_flags(stage, flags):
    options = options_of(("stage", stage))

    assert flags <= options
    assert not options & {"--model", "--data", "--helpful", "--ai", "--preferences"}


@pytest.mark.parametrize("stage", ["critique_revise", "helpful_samples", "sft", "sample_pairs"])
def test_the_chat_template_is_a_file_in_every_stage(stage, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    context = parse(["stage", stage, "--chat-template", str(template), *required_of(stage)])[2]

    assert context.params["cfg_chat_template"] == template


def required_of(stage: str) -> list[str]:
    return {
        "critique_revise": ["--prompts", "p", "--constitution", "c", "--policy", "m", "--out", "o"],
        "helpful_samples": ["--helpful-prompts", "p", "--policy", "m", "--out", "o"],
        "sft": ["--traces", "t", "--policy", "m", "--out", "o"],
        "sample_pairs": ["--prompts", "p", "--policy", "m", "--out", "o"],
    }[stage]


# -- switches and defaults ------------------------------------------------------------------------------


@pytest.fixture
def labelling_command():
    """A command whose flags are built from `FeedbackConfig`, echoing the config it receives."""
    import typer

    @config_options(FeedbackConfig, skip=RUN_CONFIG_ONLY)
    def show(*, config: FeedbackConfig) -> None:
        typer.echo(f"{config.cot} {config.clamp_cot} {config.principles_per_pair} {sorted(config.model_fields_set)}")

    one = typer.Typer()
    one.command()(show)
    return one


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "False True 4 []"),
        (["--cot"], "True True 4 ['cot']"),
        (["--no-clamp-cot"], "False False 4 ['clamp_cot']"),
        (["--cot", "--no-cot", "--principles-per-pair", "2"], "False True 2 ['cot', 'principles_per_pair']"),
    ],
)
def test_a_switch_has_both_forms_and_an_option_left_out_stays_unset(labelling_command, argv, expected):
    result = CliRunner().invoke(labelling_command, argv)

    assert result.exit_code == 0, result.output
    assert result.output.strip() == expected


def test_help_shows_every_default_and_both_forms_of_a_switch():
    result = CliRunner().invoke(app, ["stage", "label", "--help"], env={"COLUMNS": "250"})

    assert "--cot" in result.output and "--no-cot" in result.output and "[default: no-cot]" in result.output
    assert "[default: clamp-cot]" in result.output
    assert re.search(r"--principles-per-pair,--principles\s+INT\s.*\[default: 4\]", result.output)
    assert "BOOL" not in result.output


# -- a dry run writes nothing ---------------------------------------------------------------------------------


def test_a_dry_retrain_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "constitutions", repo / "constitutions")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "constitutions"], check=True)
    for name in ("MLFLOW_TRACKING_URI", "CAI_CONSTITUTION_REGISTRY", "KFP_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(repo)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".git" not in p.parts)

    result = CliRunner().invoke(app, ["retrain", "--repo", ".", "--dry-run"])

    assert result.exit_code == 0, (result.output, result.exception)
    assert "would retrain harmless@1.0.0: no champion registered for cai-harmless-rl-cai" in result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".git" not in p.parts) == before
