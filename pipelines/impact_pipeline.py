"""The impact preview as a small pipeline: `cai impact` in one step, for a team that runs it on the
cluster where its runs' artifacts and feedback models are (docs/compare.md).

    impact preview (relabels the pairs of run `against` under `constitution`; KFP HTML page)

The step labels as the label stage does, so it runs in the GPU image on the label stage's resource
profile, with the installation's secrets and settings (`_Tasks` of the main pipeline). Compile it
with `cai compile --impact --out impact.yaml`.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as types.
from pathlib import Path

from kfp import dsl

from cai_lib.core.deploy import DeployConfig
from components import stages
from pipelines.cai_pipeline import _sorted_header, _Tasks

IMPACT_PIPELINE_NAME = "constitution-impact"


def build_impact_pipeline(deploy: DeployConfig | None = None):
    """The impact pipeline, its task configured from `deploy`."""
    t = _Tasks(deploy or DeployConfig())
    component = dsl.component(stages.impact_preview, base_image=t.deploy.image_gpu, install_kfp_package=False)

    @dsl.pipeline(name=IMPACT_PIPELINE_NAME, description="What a constitution would do to an earlier run's AI labels.")
    def impact_pipeline(constitution: str, against: str, top: int = 5) -> str:
        """What a constitution would do to an earlier run's AI labels: its pairs relabelled, nothing trained.

        Args:
            constitution: The new constitution: name@version (from the constitution registry), an s3:// URI or inline YAML.
            against: The run whose pairs are relabelled: its KFP run id or MLflow run id.
            top: Pairs the page shows of those whose label moved most.
        """
        task = component(constitution=constitution, against=against, top=top)
        task.set_display_name("impact preview")
        task.set_caching_options(False)  # a preview reads what the run holds now
        t.resources(task, "label")
        t.environment(task)
        return task.outputs["Output"]

    return impact_pipeline


def compile_impact_pipeline(out: str, deploy: DeployConfig | None = None) -> str:
    """Write the impact pipeline's IR YAML; returns `out`."""
    from kfp import compiler

    compiler.Compiler().compile(build_impact_pipeline(deploy), package_path=out)
    _sorted_header(Path(out))
    return out
