"""`cai stage NAME ...`: run one stage of the method by hand, on any inputs.

Each command is named as the stage table names its stage (`cai_lib.core.stage_table`), the name
`cai run`'s summary, `--set`, `trainjob render --stage` and the run config's `resources` use too;
`train-pm` is accepted for `train_pm`, as everywhere a stage is named.
"""

import typer
from typer.core import TyperGroup

from cai_lib.cli import stage_eval, stage_feedback, stage_prompts, stage_rl, stage_sl
from cai_lib.core.stage_table import canonical


class StageGroup(TyperGroup):
    """A command group that finds `train-pm` as `train_pm`."""

    def get_command(self, ctx, cmd_name: str):
        return super().get_command(ctx, cmd_name) or super().get_command(ctx, canonical(cmd_name))


app = typer.Typer(
    cls=StageGroup,
    help="Run one stage of the method (the pipeline runs them all in order). The README's "
    "'One stage at a time' runs them in order on the embedded model.\n\n"
    "Example: cai stage critique_revise --prompts builtin:red_team --constitution harmless@1.0.0 "
    "--policy smollm2-135m-instruct --rounds 1 --max-new-tokens 32 --limit 2 --out runs/demo/traces",
    no_args_is_help=True,
)
app.command("generate_prompts")(stage_prompts.generate_prompts_command)
app.command("critique_revise")(stage_sl.critique_revise_command)
app.command("helpful_samples")(stage_sl.helpful_samples_command)
app.command("sft")(stage_sl.sft_command)
app.command("sample_pairs")(stage_feedback.sample_pairs_command)
app.command("label")(stage_feedback.label_command)
app.command("label_accuracy")(stage_feedback.label_accuracy_command)
app.command("validate_labels")(stage_feedback.validate_labels_command)
app.command("train_pm")(stage_rl.train_pm)
app.command("rl")(stage_rl.rl)
app.command("evaluate")(stage_eval.evaluate_command)
