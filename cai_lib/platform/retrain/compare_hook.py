"""How a retrain explains itself: the run it submits is compared, once evaluated, with the run that
made the champion it challenges. The run's `compare_against` parameter names that run (its KFP run
id, from the champion's lineage); the pipeline's compare step does the rest
(`cai_lib.steps.compare`)."""

from __future__ import annotations

from cai_lib.core.constitution import Constitution
from cai_lib.core.names import CHAMPION, RL_CAI, model_name
from cai_lib.platform.run_config import RunConfig


def compare_against(tracking_uri: str | None, config: RunConfig, constitution: Constitution) -> str:
    """The pipeline run that made the RL-CAI champion of `constitution`'s models, or '' when there
    is no champion (or no registry) yet."""
    from cai_lib.core.model_versions import version_by_alias

    if not tracking_uri:
        return ""
    name = model_name(config.params.model_name_prefix, constitution.name, RL_CAI)
    champion = version_by_alias(tracking_uri, name, CHAMPION)
    return champion.lineage.pipeline_run_id if champion and champion.lineage else ""
