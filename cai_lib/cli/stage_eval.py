"""`cai stage evaluate` and `cai report`: evaluation of policies and its HTML report.

Plain functions with typer annotations; `cai_lib.cli` registers them. Option defaults and help
come from `EvaluationConfig`, so the CLI and the run config cannot drift.
"""

from __future__ import annotations

import typer

from cai_lib.cli.config_options import config_options
from cai_lib.cli.stage_sl import CONSTITUTION, PROMPT_SOURCES, _read_prompts
from cai_lib.core.errors import CaiError
from cai_lib.engines.models import EMBEDDED_ALIAS
from cai_lib.method.evaluation.config import EvaluationConfig

# At module level because a call in the default of a list-typed parameter reads as a shared mutable default.
POLICIES = typer.Option(
    ...,
    "--policy",
    help="A policy to evaluate, as in the other stages; repeat it for each policy, in order. Each is named "
    "in the report by the last part of its ref (runs/demo/sl-cai is sl-cai), or by NAME in NAME=REF.",
)


def parse_policies(values: list[str]) -> dict[str, str]:
    """`REF` or `NAME=REF` strings as an ordered name -> ref mapping (a bare ref is named by its last
    path part); an empty or repeated name is a `CaiError`."""
    policies: dict[str, str] = {}
    for value in values:
        name, sep, ref = value.partition("=")
        if not sep:
            name, ref = value.rstrip("/").rpartition("/")[2], value
        if not name.strip() or not ref.strip():
            raise CaiError(f"--policy {value}: expected REF or NAME=REF, e.g. --policy runs/demo/sl-cai")
        if name.strip() in policies:
            raise CaiError(
                f"--policy {value}: the name '{name.strip()}' is given twice; name them apart with NAME=REF"
            )
        policies[name.strip()] = ref.strip()
    return policies


@config_options(
    EvaluationConfig,
    # The pipeline's rule for its labelling stage, not a setting of an evaluation.
    skip=frozenset({"hold_out_judge_principles"}),
    aliases={"num_samples_in_report": "--samples"},
)
def evaluate_command(
    policy: list[str] = POLICIES,
    reward: str = typer.Option(..., "--reward", help="The preference model written by `cai stage train_pm`."),
    constitution: str = CONSTITUTION,
    prompts: str = typer.Option(..., "--prompts", help=f"Held-out red-team prompts: {PROMPT_SOURCES}."),
    out: str = typer.Option(
        ...,
        "--out",
        help="Local directory or s3:// prefix for metrics.json, answers, judgements and report.html.",
    ),
    helpful_prompts: str | None = typer.Option(
        None, "--helpful-prompts", help="Held-out helpfulness prompts (same sources); omit to skip them."
    ),
    judge_model: str = typer.Option(
        ...,
        "--judge-model",
        help="Model that judges comparisons and evasiveness: of another family than the feedback model and the "
        "policies. One that names the same model as either is refused unless --allow-dependent-judge says why "
        f"(e.g. {EMBEDDED_ALIAS} everywhere in a CPU demo).",
    ),
    feedback_model: str | None = typer.Option(
        None,
        "--feedback-model",
        help="The feedback model that labelled the training pairs, so that a judge that is the same model is "
        "refused (or, when allowed, said in the report).",
    ),
    traces: str | None = typer.Option(
        None,
        "--traces",
        help="SL-CAI traces (written by `cai stage critique_revise`) for per-principle statistics.",
    ),
    limit: int | None = typer.Option(None, "--limit", help="Use the first K distinct prompts of each set."),
    *,
    config: EvaluationConfig,
) -> None:
    """Evaluate policies (paper §3.3, §4.3-4.4): PM scores, win rates, Elo, evasiveness, per-principle effects,
    and refusals on XSTest (--xstest-prompts; '' leaves it out).

    Writes metrics.json, answers.jsonl, judgements.jsonl and a self-contained report.html to --out.

    Example: cai stage evaluate --policy base=smollm2-135m-instruct --policy runs/demo/sl-cai --reward runs/demo/pm --constitution harmless@1.0.0 --prompts builtin:red_team --helpful-prompts builtin:helpful --limit 4 --xstest-prompts builtin:refusal_contrast --xstest-limit 4 --judge-model smollm2-135m-instruct --allow-dependent-judge --dependent-judge-reason "CPU demo: one embedded model plays every part" --out runs/demo/eval-cpu
    """
    from cai_lib.core.constitution import load_constitution
    from cai_lib.method.evaluation.config import CLI_ALLOWANCE, check_judge
    from cai_lib.method.evaluation.evaluate import dependence_of, evaluate
    from cai_lib.method.evaluation.xstest import read_xstest

    policies = parse_policies(policy)
    # Before any prompt set is read: a judge that cannot be used makes the rest moot.
    check_judge(judge_model, dependence_of(judge_model, policies, feedback_model, config), config, "--judge-model", CLI_ALLOWANCE)
    loaded = load_constitution(constitution)
    red_team = _read_prompts(prompts, "red_team", limit)
    helpful = _read_prompts(helpful_prompts, "helpful", limit) if helpful_prompts else []
    trace_rows = _read_traces(traces) if traces else None
    xstest = config.xstest
    xstest_prompts = read_xstest(xstest.prompts, xstest.limit, config.seed) if xstest.prompts else []
    result = evaluate(
        policies,
        reward,
        judge_model,
        loaded,
        red_team,
        helpful,
        out,
        config,
        trace_rows,
        feedback_model,
        xstest=xstest_prompts,
    )
    for key, value in result.flat_metrics().items():
        typer.echo(f"{key}\t{value:.4f}")
    typer.echo(
        f"wrote the evaluation of {len(policies)} policies to {out} (report: {out.rstrip('/')}/report.html)"
    )


def report_command(
    uri: str = typer.Argument(
        ..., help="The --out of `cai stage evaluate` (local directory or s3:// prefix)."
    ),
) -> None:
    """Write or refresh the HTML report of an evaluation from its metrics.json.

    Example: cai report runs/demo/eval
    """
    from cai_lib.method.evaluation.report import refresh_report

    typer.echo(f"wrote {refresh_report(uri)}")


def _read_traces(uri: str):
    from cai_lib.core.records import Trace
    from cai_lib.core.shards import read_dataset

    return list(read_dataset(uri, Trace))
