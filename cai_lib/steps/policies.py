"""Which policies an evaluation compares: base, SL-CAI, the human-feedback references, the policies
RL saved on the way, RL-CAI, and the registered champion when it is another checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from cai_lib.core.constitution import Constitution
from cai_lib.core.names import BASE, CHAMPION, CHAMPION_POLICY, RL_CAI, SL_CAI, model_name
from cai_lib.core.store import ArtifactStore
from cai_lib.steps.context import DataRef, RunContext

if TYPE_CHECKING:
    pass


def champion_source(ctx: RunContext, constitution: Constitution) -> tuple[str, str, str] | None:
    """(version, checkpoint URI, checkpoint sha256) of the registered RL-CAI champion, if any."""
    from cai_lib.core.model_versions import version_by_alias

    champion = version_by_alias(ctx.tracking_uri, model_name(ctx.params.model_name_prefix, constitution.name, RL_CAI), CHAMPION)
    if champion is None:
        return None
    return champion.version, champion.source, champion.checkpoint_sha256 or ""


class EvaluatedPolicies(NamedTuple):
    """What an evaluation compares: policy name -> model reference, the RL step of each policy on
    the RL run's path (Fig. 8), and the registered champion (version, source, sha256) if any."""

    policies: dict[str, str]
    rl_steps: dict[str, int]
    champion: tuple[str, str, str] | None


def evaluated_policies(
    ctx: RunContext,
    constitution: Constitution,
    sl: DataRef,
    rl: DataRef,
    references: dict[str, DataRef] | None = None,
) -> EvaluatedPolicies:
    """Base, SL-CAI, the human-feedback `references` (helpful-rlhf, hh-rlhf), the policies RL saved
    on the way (`rl-cai-step-N`), RL-CAI, and the registered champion when it is another checkpoint
    than this run's RL-CAI."""
    from cai_lib.method.rl import METRICS_FILE, RLMetrics

    rl_metrics = RLMetrics.model_validate(ArtifactStore.open(rl.uri).read_json(METRICS_FILE))
    rl_steps = (
        {SL_CAI: 0}
        | {f"{RL_CAI}-step-{n}": n for n in rl_metrics.intermediate}
        | {RL_CAI: rl_metrics.steps}
    )
    policies = {
        BASE: ctx.model(ctx.params.base_model).load,
        SL_CAI: sl.uri,
        **{name: ref.uri for name, ref in (references or {}).items()},
        **{f"{RL_CAI}-step-{n}": uri for n, uri in rl_metrics.intermediate.items()},
        RL_CAI: rl.uri,
    }
    champion = champion_source(ctx, constitution)
    # A champion that is this run's own RL-CAI checkpoint (a rerun with nothing changed) would
    # only be compared with itself.
    if champion and champion[2] == rl.sha256:
        champion = None
    if champion:
        policies[CHAMPION_POLICY] = champion[1]
    return EvaluatedPolicies(policies, rl_steps, champion)
