"""Run-config pieces the end-to-end tests share."""

# A few generated prompts from a tiny random model: enough that the stage runs in every shard and
# its mix reaches training. Any length is kept (its replies are noise of a few tokens).
TINY_GENERATED_PROMPTS = {
    "few_shot": 2,
    "max_new_tokens": 8,
    "min_chars": 1,
    "red_team": {"candidates": 4, "generated_per_human": 0.25},
    "helpful": {"candidates": 2, "generated_per_human": 0.5},
}
