"""How a training step trains: a multi-node TrainJob when the pipeline compiled one into the
step's environment, else in the step's pod (under torchrun with more than one process).
"""

from __future__ import annotations

from cai_lib.engines.launch import TrainingJob, launch, stage_config
from cai_lib.engines.training import process_count, visible_gpus


def train(job: TrainingJob) -> dict:
    """Run a training stage: as a multi-node TrainJob when the pipeline compiled one into this
    step's environment, else here with one process per GPU the pod sees (under torchrun when
    more than one) or as the stage's `processes` setting says. Returns rank 0's metrics."""
    from cai_lib.engines.trainjob import TrainJobPlan, run_trainjob, trainer_client

    plan = TrainJobPlan.from_environment()
    if plan is not None:
        return run_trainjob(trainer_client(), plan, job)
    return launch(job, process_count(stage_config(job), visible_gpus()))
