"""Which policies an evaluation compares: base, SL-CAI, the human-feedback references, the policies
RL saved on the way, RL-CAI, and the registered champion when it is another checkpoint.
"""

from __future__ import annotations

from typing import NamedTuple

from cai_lib.core.constitution import Constitution
from cai_lib.core.names import BASE, CHAMPION, CHAMPION_POLICY, RL_CAI, SL_CAI, model_name
from cai_lib.core.store import ArtifactStore
from cai_lib.steps.context import DataRef, RunContext


class Champion(NamedTuple):
    """The registered RL-CAI champion: version, checkpoint URI and sha256, and the checkpoint sha256s
    of the versions it continues (iterated CAI's earlier rounds)."""

    version: str
    source: str
    sha256: str
    ancestors: frozenset[str]


def champion_source(ctx: RunContext, constitution: Constitution) -> Champion | None:
    """The registered RL-CAI champion, if any; a champion that fails `verified_version` is
    refused rather than evaluated against."""
    from cai_lib.core.model_versions import ancestors, verified_version, version_by_alias
    from cai_lib.core.tracking import connect

    name = model_name(ctx.params.model_name_prefix, constitution.name, RL_CAI)
    champion = version_by_alias(ctx.tracking_uri, name, CHAMPION)
    if champion is None:
        return None
    champion = verified_version(connect(ctx.tracking_uri), name, champion.version)
    before = frozenset(v.checkpoint_sha256 or "" for v in ancestors(ctx.tracking_uri, champion))
    return Champion(champion.version, champion.source, champion.checkpoint_sha256 or "", before)


class EvaluatedPolicies(NamedTuple):
    """What an evaluation compares: policy name -> model reference, the RL step of each policy on
    the RL run's path (Fig. 8), the registered champion (version, source, sha256) if any, the
    round of each policy of iterated CAI (SL-CAI is round 0; empty with one round), and the name
    under which the champion is evaluated (`champion`, or the earlier round it is)."""

    policies: dict[str, str]
    rl_steps: dict[str, int]
    champion: Champion | None
    rounds: dict[str, int]
    champion_policy: str | None
    superseded: bool = False  # the champion continues this policy (a rerun of an earlier round)


def round_policy(round_: int) -> str:
    """The name under which an earlier round's RL-CAI policy is evaluated."""
    return f"{RL_CAI}-round-{round_}"


def evaluated_policies(
    ctx: RunContext,
    constitution: Constitution,
    sl: DataRef,
    rl: DataRef,
    references: dict[str, DataRef] | None = None,
) -> EvaluatedPolicies:
    """Base, SL-CAI, the human-feedback `references` (helpful-rlhf, hh-rlhf), the policies RL saved
    on the way (`rl-cai-step-N`), the RL-CAI policies of the earlier rounds of iterated CAI
    (`rl-cai-round-K`, from `rl`'s chain), RL-CAI, and the registered champion when it is another
    checkpoint than these."""
    from cai_lib.method.rl import METRICS_FILE, RLMetrics

    rl_metrics = RLMetrics.model_validate(ArtifactStore.open(rl.uri).read_json(METRICS_FILE))
    rl_steps = (
        {SL_CAI: 0}
        | {f"{RL_CAI}-step-{n}": n for n in rl_metrics.intermediate}
        | {RL_CAI: rl_metrics.steps}
    )
    earlier = {round_policy(k): ref for k, ref in enumerate(rl.earlier, start=1)}
    policies = {
        BASE: ctx.model(ctx.params.base_model).load,
        SL_CAI: sl.uri,
        **{name: ref.uri for name, ref in (references or {}).items()},
        **{f"{RL_CAI}-step-{n}": uri for n, uri in rl_metrics.intermediate.items()},
        **{name: ref.uri for name, ref in earlier.items()},
        RL_CAI: rl.uri,
    }
    rounds = {SL_CAI: 0, **{round_policy(k): k for k in range(1, len(earlier) + 1)}, RL_CAI: len(earlier) + 1}
    champion = champion_source(ctx, constitution)
    # A champion that is this run's own RL-CAI checkpoint (a rerun with nothing changed) would
    # only be compared with itself; one that is an earlier round's policy is evaluated as that round;
    # one that continues this policy (a later round of a run this one repeats) is left out too, and
    # the register step does not gate this policy again.
    superseded = bool(champion and rl.sha256 in champion.ancestors)
    if champion and (champion.sha256 == rl.sha256 or superseded):
        champion = None
    named = next((name for name, ref in earlier.items() if champion and ref.sha256 == champion.sha256), None)
    if champion and named is None:
        policies[CHAMPION_POLICY] = champion.source
        named = CHAMPION_POLICY
    return EvaluatedPolicies(policies, rl_steps, champion, rounds if earlier else {}, named, superseded)
