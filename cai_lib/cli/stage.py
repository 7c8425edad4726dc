"""`cai stage NAME ...`: run one stage of the method by hand, on any inputs."""

import typer

from cai_lib.cli import stage_eval, stage_feedback, stage_prompts, stage_rl, stage_sl

app = typer.Typer(
    help="Run one stage of the method (the pipeline runs them all in order).", no_args_is_help=True
)
app.command("generate-prompts")(stage_prompts.generate_prompts_command)
app.command("critique-revise")(stage_sl.critique_revise_command)
app.command("helpful-samples")(stage_sl.helpful_samples_command)
app.command("sft")(stage_sl.sft_command)
app.command("sample-pairs")(stage_feedback.sample_pairs_command)
app.command("label")(stage_feedback.label_command)
app.command("label-accuracy")(stage_feedback.label_accuracy_command)
app.command("train-pm")(stage_rl.train_pm)
app.command("rl")(stage_rl.rl)
app.command("evaluate")(stage_eval.evaluate_command)
