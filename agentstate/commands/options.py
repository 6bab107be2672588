"""Options of the experiment verbs (``run``, ``predict-atari``), derived from ``RunConfig``.

Each field of :class:`~agentstate.experiment.RunConfig` becomes the option ``--<field>``
(underscores as hyphens, a trailing one dropped: ``lambda_`` is ``--lambda``), typed and
defaulted from the field and documented by the field's own docstring; booleans take
``--<field>`` / ``--no-<field>``; a dict field ``learner_kwargs`` takes repeated
``--learner-kwarg KEY=VALUE``. A verb passes its own defaults (``predict-atari`` has the Atari
benchmark's) and reads the config back with :func:`config_from_args`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Collection, Sequence
from typing import Any

from agentstate.experiment import RunConfig
from agentstate.optim import OPTIMIZERS

CHOICES = {"optimizer": list(OPTIMIZERS), "dtype": ["float32", "float64"]}
ALIASES = {"step_size": ["--lr"], "head_step_size": ["--head-lr"], "include_bias": ["--head-bias"]}
"""Older spellings kept working (``--lr`` is ``--step-size``)."""


def parse_key_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``["n_features=7", "init_scale=0.1"]`` -> ``{"n_features": 7, "init_scale": 0.1}``.

    Values are Python literals where they parse as one (numbers, booleans, tuples), else
    strings.
    """
    parsed: dict[str, Any] = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key:
            raise SystemExit(f"error: {flag} expects KEY=VALUE, got {item!r}")
        try:
            parsed[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed[key] = text
    return parsed


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal right below it), first sentence."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for statement, following in zip(body, body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            text = " ".join(following.value.value.split())
            docs[statement.target.id] = text.replace("%", "%%")
    return docs


def option_name(field_name: str) -> str:
    """``step_size`` -> ``--step-size``; ``lambda_`` -> ``--lambda``; dicts: singular."""
    name = field_name.rstrip("_").replace("_", "-")
    return f"--{name[:-1]}" if name.endswith("-kwargs") else f"--{name}"


def add_config_options(
    parser: argparse.ArgumentParser,
    defaults: RunConfig,
    *,
    exclude: Collection[str] = (),
    helps: dict[str, str] | None = None,
) -> None:
    """Add one option per field of ``RunConfig`` but ``exclude``, defaulting to ``defaults``.

    Args:
        parser: the verb's parser.
        defaults: the verb's defaults.
        exclude: fields the verb sets itself (e.g. the positional ``env``).
        helps: field -> help text worded for the verb (default: the field's docstring).
    """
    docs = {**field_docs(RunConfig), **(helps or {})}
    for field in dataclasses.fields(RunConfig):
        if field.name in exclude:
            continue
        flags = [option_name(field.name), *ALIASES.get(field.name, [])]
        value = getattr(defaults, field.name)
        help_text = docs.get(field.name, "")
        kind = str(field.type)
        if kind.startswith("dict"):
            parser.add_argument(
                flags[0], dest=field.name, action="append", default=[], metavar="KEY=VALUE",
                help=f"{help_text} (repeatable)",
            )  # fmt: skip
        elif kind == "bool":
            parser.add_argument(
                *flags, dest=field.name, action=argparse.BooleanOptionalAction, default=value,
                help=help_text,
            )  # fmt: skip
        else:
            converter = int if kind == "int" else float if kind.startswith("float") else str
            parser.add_argument(
                *flags, dest=field.name, type=converter, default=value,
                choices=CHOICES.get(field.name), help=f"{help_text} (default: %(default)s)",
            )  # fmt: skip


def config_from_args(args: argparse.Namespace, defaults: RunConfig, **fixed: Any) -> RunConfig:
    """The ``RunConfig`` the parsed ``args`` describe.

    ``fixed`` fields first, then the options, then ``defaults`` for fields without an option.
    """
    values: dict[str, Any] = {}
    for field in dataclasses.fields(RunConfig):
        if field.name in fixed:
            values[field.name] = fixed[field.name]
        elif hasattr(args, field.name):
            value = getattr(args, field.name)
            if str(field.type).startswith("dict"):
                value = parse_key_values(value, option_name(field.name))
            values[field.name] = value
        else:
            values[field.name] = getattr(defaults, field.name)
    return RunConfig(**values)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--out`` and ``--no-progress``."""
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
