"""YAML a user writes (constitutions, run configs, `--set` values), parsed one way.

PyYAML's safe loader keeps the last of two equal keys in a mapping and drops the other without
a word, so a run config with `rounds:` twice runs with whichever came last. Here a repeated key is
an error naming the key and its line, as is any syntax error.
"""

from __future__ import annotations

import yaml

from cai_lib.core.errors import CaiError


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses repeated mapping keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str) -> object:
    """Parse YAML text; an error is one `CaiError` naming `where`, the line and column, and the problem."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise CaiError(f"{where}: {yaml_problem(err)}") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """'line L, column C: PROBLEM' of a PyYAML error (the problem alone where it has no position)."""
    mark = getattr(err, "problem_mark", None)
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{at}YAML syntax error: {problem}"
