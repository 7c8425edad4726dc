"""Command-line options built from a config model: one flag per field, its help the field's description.

As TRL's parser builds flags from its config dataclasses, `config_options` gives a typer command one
option per field of a pydantic config (a nested model's fields flattened under its name, as in
`--engine-max-model-len`) and calls the command with the validated config. A flag left out keeps
the config's default, so the command line, the run config and the defaults cannot drift apart.
Help shows each default; a switch is `--x/--no-x`; a field holding a file's content (a chat
template) takes the file's path.
"""

from __future__ import annotations

import enum
import functools
import inspect
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError

from cai_lib.core.errors import CaiError
from cai_lib.core.text import read_text_file
from cai_lib.core.uris import is_s3

Config = TypeVar("Config", bound=BaseModel)


# Fields whose value is a file's content: on the command line the flag takes the file's path.
FILE_FIELDS = frozenset({"chat_template"})


class Flag:
    """One generated option: the config field it sets (a path through nested models) and its type."""

    def __init__(
        self,
        path: tuple[str, ...],
        annotation: type,
        description: str | None,
        default: object,
        alias: str | None = None,
    ):
        self.path = path
        self.name = "cfg_" + "__".join(path)
        self.flag = "--" + "-".join(path).replace("_", "-")
        self.alias = alias
        self.is_file = path[-1] in FILE_FIELDS
        self.annotation = Path if self.is_file else annotation
        self.default = default
        choices = f" One of: {', '.join(m.value for m in annotation)}." if isinstance(annotation, enum.EnumMeta) else ""
        self.help = f"{description or ''}{choices}".strip() + (" Give the path of a file that holds it." if self.is_file else "")

    def parameter(self) -> inspect.Parameter:
        # Every switch has both forms, so a command line can turn off what a default turns on.
        decls = f"{self.flag}/--no-{self.flag[2:]}" if self.annotation is bool else self.flag
        return inspect.Parameter(
            self.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                self.shown_default,
                decls,
                *filter(None, [self.alias]),
                help=self.help,
                show_default=True,
                metavar=None if self.annotation is bool else _metavar(self.annotation),
            ),
            annotation=self.annotation | None,
        )

    @property
    def shown_default(self) -> object:
        """The config's default as the option's own, for help to show (a file field has none)."""
        if self.is_file or self.default is None:
            return None
        return self.annotation(self.default) if isinstance(self.annotation, enum.EnumMeta) else self.default

    def value(self, given: object) -> object:
        """The config value of what the command line gave: an enum's value, a file's text."""
        if isinstance(given, enum.Enum):
            return given.value
        if self.is_file:
            return read_text_file(given)
        return given


def flags_of(
    config: type[BaseModel],
    skip: frozenset[str] = frozenset(),
    prefix: tuple[str, ...] = (),
    aliases: dict[str, str] | None = None,
) -> Iterator[Flag]:
    """A `Flag` for each field of `config` (recursing into nested models) except those in `skip`;
    `aliases` gives a top-level field a second, shorter flag."""
    # The config's own fields first, then inherited ones (the shared hardware settings).
    own = inspect.get_annotations(config)
    for name, info in sorted(config.model_fields.items(), key=lambda item: item[0] not in own):
        if name in skip:
            continue
        annotation = _required(info.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from flags_of(annotation, frozenset(), (*prefix, name))
            continue
        default = info.get_default(call_default_factory=True)
        alias = (aliases or {}).get(name) if not prefix else None
        yield Flag((*prefix, name), _option_type(annotation, name), info.description, default, alias)


def config_options(
    config: type[Config], skip: frozenset[str] = frozenset(), aliases: dict[str, str] | None = None
) -> Callable:
    """Decorate a command taking `config: Config` so that it takes one option per field instead.

    The command's own parameters stay first; `skip` names fields the command sets itself (it then
    receives their config default unless it builds the config again); `aliases` keeps a shorter
    flag a field had before its flag was generated (`{"principles_per_pair": "--principles"}`).
    """
    flags = list(flags_of(config, skip, aliases=aliases))

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command).parameters.values() if p.name != "config"]
        taken = {decl for p in own for decl in getattr(p.default, "param_decls", None) or ()}
        clashes = sorted(taken & {name for flag in flags for name in (flag.flag, flag.alias) if name})
        if clashes:
            raise TypeError(f"{command.__name__}: options {clashes} are also flags of {config.__name__}'s fields")

        @functools.wraps(command)
        def wrapper(ctx: typer.Context, **values):
            # Every reference a stage takes (an output, a model, a dataset, a prompt source) is
            # checked before any model loads: a mistyped `s3:` URI is one line now, not after minutes.
            for param in ctx.command.params:
                value = values.get(param.name)
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, str):
                        try:
                            is_s3(item)
                        except CaiError as err:
                            raise CaiError(f"{param.opts[0]}: {err}") from None
            settings: dict = {}
            for flag in flags:
                value = values.pop(flag.name)
                # Only what the command line gave is set: a field left out keeps the config's
                # default and stays "not set" (a seed, for one, is then derived, not pinned).
                if ctx.get_parameter_source(flag.name).name != "DEFAULT":
                    _put(settings, flag.path, flag.value(value))
            return command(**values, config=config_from(config, **settings))

        context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        wrapper.__signature__ = inspect.Signature([context, *own, *(flag.parameter() for flag in flags)])
        return wrapper

    return decorate


def config_from(config: type[Config], **values) -> Config:
    """Validate command-line values into `config`; a bad value is a `CaiError` naming its option."""
    try:
        return config(**values)
    except ValidationError as err:
        first = err.errors()[0]
        option = (
            "--" + "-".join(str(part) for part in first["loc"]).replace("_", "-")
            if first["loc"]
            else "options"
        )
        raise CaiError(f"{option}: {first['msg'].removeprefix('Value error, ')}") from None


def _put(settings: dict, path: tuple[str, ...], value: object) -> None:
    for part in path[:-1]:
        settings = settings.setdefault(part, {})
    settings[path[-1]] = value


def _required(annotation):
    """`X` for `X | None`; the annotation itself otherwise."""
    if get_origin(annotation) in (Union, types.UnionType):
        present = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(present) == 1:
            return present[0]
    return annotation


def _option_type(annotation, name: str) -> type:
    if get_origin(annotation) is Literal:
        choices = [str(choice) for choice in get_args(annotation)]
        return enum.Enum(name.title().replace("_", ""), {choice: choice for choice in choices}, type=str)
    if annotation in (bool, int, float, str):
        return annotation
    raise TypeError(f"config field '{name}': no command-line option for type {annotation!r}")


def _metavar(annotation: type) -> str:
    # Short type names keep the flag column wide enough for the longest flag.
    if isinstance(annotation, enum.EnumMeta):
        return "CHOICE"
    return "FILE" if annotation is Path else annotation.__name__.upper()
