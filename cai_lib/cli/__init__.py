"""The `cai` command line. Each command group lives in its own module beside this one.

Heavy libraries (torch, transformers, kfp, mlflow) are imported inside commands, so
`cai --help` and `cai constitution validate` start fast.
"""

from __future__ import annotations

import sys

import typer

from cai_lib.cli import (
    compare,
    constitution,
    mlflow_accounts,
    models,
    pipeline,
    pipeline_submit,
    prompts,
    serve,
    stage,
    stage_eval,
    trainjob,
)
from cai_lib.core.errors import CaiError

app = typer.Typer(
    help="Constitutional AI on Kubernetes: constitutions, SL-CAI, AI feedback, preference models, RL-CAI.\n\n"
    "Example: cai run --quick",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(constitution.app, name="constitution")
app.add_typer(prompts.app, name="prompts")
app.add_typer(stage.app, name="stage")
app.add_typer(models.app, name="models")
app.add_typer(trainjob.app, name="trainjob")
app.add_typer(serve.app, name="serve")
app.add_typer(mlflow_accounts.app, name="mlflow")
app.command("run")(pipeline.run_command)
app.command("compile")(pipeline.compile_command)
app.command("submit")(pipeline_submit.submit_command)
app.command("retrain")(pipeline_submit.retrain_command)
app.command("promote")(models.promote_command)
app.command("report")(stage_eval.report_command)
app.command("compare")(compare.compare_command)
app.command("impact")(compare.impact_command)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    try:
        app()
    except CaiError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
