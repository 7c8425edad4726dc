"""The human-feedback references that CAI is compared with (Bai et al. 2022, §4.3, Figs. 2 and 3).

The paper places SL-CAI and RL-CAI on a harmlessness-helpfulness Elo frontier beside two policies
trained with RL from *human* feedback (from its earlier work, Bai et al. 2022a): a **helpful-only
RLHF** policy, whose PM learned from human helpfulness comparisons alone, and an **HH RLHF**
policy, whose PM learned from human helpfulness and harmlessness comparisons. CAI's claim is
that RL-CAI is more harmless than HH RLHF at about its helpfulness, without being evasive, while
helpful-only RLHF is the most helpful and the least harmless.

Here each reference is made with the same code as RL-CAI, so the only difference is where the
preference labels come from:

- its PM is `cai_lib.method.preference_model` trained from the base model on human pairs only:
  hh-rlhf's helpful-base comparisons (`helpful_pairs`) for helpful-rlhf, those and hh-rlhf's
  harmless-base comparisons (`harmless_pairs`, as many of each) for hh-rlhf; with the run's
  `preference_model` settings, the human share forced to 1;
- its policy is `cai_lib.method.rl` from the base model against that PM, on the same training
  prompts and with the same `rl` settings as RL-CAI (with `rl.algorithm: dpo`, DPO on the PM's
  human pairs instead);
- the evaluation judges it with SL-CAI and RL-CAI, in one tournament, by one judge.

Where it departs: the paper's references were trained on far more human data, with PPO, from its
own pretrained models; here they start from the run's base model (the same start as SL-CAI), with
the run's PM and RL settings, so the comparison isolates the labels.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cai_lib.core.records import Preference
from cai_lib.method.preference_model import PreferenceModelConfig

# The references, by the policy names an evaluation rates them under (evaluated, never registered).
ReferenceKind = Literal["helpful-rlhf", "hh-rlhf"]
REFERENCE_KINDS: tuple[ReferenceKind, ...] = ("helpful-rlhf", "hh-rlhf")


class ReferencesConfig(BaseModel):
    """Which human-feedback references to train beside CAI, and from which human comparisons."""

    model_config = ConfigDict(extra="forbid")

    policies: list[ReferenceKind] = Field(
        default_factory=list,
        description="The references to train and evaluate beside SL-CAI and RL-CAI (the paper's Figs. 2, 3): "
        "helpful-rlhf (a PM on human helpfulness comparisons) and hh-rlhf (on helpfulness and harmlessness "
        "comparisons). Empty: none, as in the quick demo; each costs a PM and an RL run.",
    )
    helpful_pairs: str = Field(
        default="hf:Anthropic/hh-rlhf/helpful-base:train",
        description="hh-rlhf-format source of human helpfulness comparisons (both references).",
    )
    harmless_pairs: str = Field(
        default="hf:Anthropic/hh-rlhf/harmless-base:train",
        description="hh-rlhf-format source of human harmlessness comparisons (hh-rlhf only).",
    )
    num_pairs: int = Field(
        default=1000, ge=1, description="Comparisons read from each source (the first ones)."
    )

    @field_validator("policies")
    @classmethod
    def _each_once(cls, policies: list[ReferenceKind]) -> list[ReferenceKind]:
        if len(set(policies)) != len(policies):
            raise ValueError(f"names a reference twice: {policies}")
        return policies

    def sources(self, kind: ReferenceKind) -> list[str]:
        """The human comparisons the PM of reference `kind` learns from."""
        return [self.helpful_pairs] if kind == "helpful-rlhf" else [self.helpful_pairs, self.harmless_pairs]


def reference_pairs(kind: ReferenceKind, config: ReferencesConfig) -> list[Preference]:
    """The human comparisons the PM of reference `kind` learns from, `num_pairs` from each source."""
    from cai_lib.method.human_preferences import read_human_preferences

    return [pair for source in config.sources(kind) for pair in read_human_preferences(source, config.num_pairs)]


def reference_pm_settings(settings: PreferenceModelConfig) -> PreferenceModelConfig:
    """The run's PM settings for a reference's PM: human pairs only."""
    return settings.model_copy(update={"human_fraction": 1.0})
