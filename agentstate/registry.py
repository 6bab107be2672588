"""The plugin manager: loads learner plugins from the ``agentstate`` entry-point group.

Built-in learners are entry points of the ``agentstate`` distribution itself, exactly as a
third party's would be.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import warnings
from dataclasses import dataclass
from typing import Any

import pluggy
import torch

from agentstate import hookspecs
from agentstate.learner import StateLearner

ENTRY_POINT_GROUP = "agentstate"


@dataclass(frozen=True)
class LearnerSpec:
    """What a plugin declares about one learner.

    Attributes:
        name: unique registered name (``make_learner(name, ...)``).
        learner_class: a ``StateLearner`` subclass built as
            ``learner_class(input_size, config, streams=..., independent_params=...,
            dtype=..., device=..., seed=...)``.
        config_class: a dataclass whose fields are the learner's keyword arguments.
        exact: whether ``grad`` is the exact gradient.
        summary: one line for ``agentstate learners``.
    """

    name: str
    learner_class: type[StateLearner]
    config_class: type
    exact: bool
    summary: str = ""


@dataclass(frozen=True)
class RegisteredLearner:
    """A learner spec with the distribution that provided it."""

    spec: LearnerSpec
    distribution: str


@dataclass(frozen=True)
class PluginLoadError:
    """A plugin that failed to import or to declare its learners."""

    plugin: str
    distribution: str
    error: str


class LearnerRegistry:
    """Owns the pluggy plugin manager and the name -> learner table."""

    def __init__(self) -> None:
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.plugin_manager.add_hookspecs(hookspecs)
        self.load_errors: list[PluginLoadError] = []
        self._learners: dict[str, RegisteredLearner] | None = None
        self._plugin_distribution: dict[int, str] = {}

    # ---------------------------------------------------------------- loading
    def _load_plugins(self) -> None:
        seen: set[str] = set()
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            distribution = entry_point.dist.name if entry_point.dist else "unknown"
            if entry_point.name in seen:
                continue
            seen.add(entry_point.name)
            try:
                plugin = entry_point.load()
            except Exception as error:  # a broken plugin must not take the others down
                self._report(entry_point.name, distribution, error)
                continue
            self._register(plugin, entry_point.name, distribution)
        self.plugin_manager.check_pending()

    def _register(self, plugin: Any, name: str, distribution: str) -> None:
        self.plugin_manager.register(plugin, name=name)
        self._plugin_distribution[id(plugin)] = distribution

    def _report(self, plugin: str, distribution: str, error: BaseException) -> None:
        failure = PluginLoadError(plugin, distribution, f"{type(error).__name__}: {error}")
        self.load_errors.append(failure)
        warnings.warn(
            f"agentstate plugin {plugin!r} from distribution {distribution!r} failed to load "
            f"and was skipped ({failure.error})",
            RuntimeWarning,
            stacklevel=3,
        )

    def learners(self) -> dict[str, RegisteredLearner]:
        """The name -> learner table, loading plugins on first use."""
        if self._learners is None:
            self._load_plugins()
            table: dict[str, RegisteredLearner] = {}
            hook = self.plugin_manager.hook.agentstate_learners
            for implementation in reversed(hook.get_hookimpls()):
                distribution = self._plugin_distribution.get(id(implementation.plugin), "?")
                try:
                    specs = _declared_specs(implementation.function())
                except Exception as error:
                    self._report(implementation.plugin_name, distribution, error)
                    continue
                for spec in specs:
                    if spec.name in table:
                        raise ValueError(
                            f"learner name {spec.name!r} is declared twice: by "
                            f"{table[spec.name].distribution!r} and by {distribution!r}; "
                            "uninstall one of them"
                        )
                    table[spec.name] = RegisteredLearner(spec, distribution)
            self._learners = table
        return self._learners

    def spec(self, name: str) -> LearnerSpec:
        """The spec registered under ``name``; an unknown name lists the known ones."""
        learners = self.learners()
        if name not in learners:
            raise KeyError(
                f"unknown learner {name!r}; known learners: {', '.join(sorted(learners))}"
            )
        return learners[name].spec


def _declared_specs(declared: object) -> list[LearnerSpec]:
    """What an ``agentstate_learners`` implementation returned, checked to be specs."""
    if not isinstance(declared, list | tuple) or not all(
        isinstance(spec, LearnerSpec) for spec in declared
    ):
        raise TypeError(
            f"agentstate_learners must return a list of agentstate.LearnerSpec; got {declared!r}"
        )
    return list(declared)


_REGISTRY: LearnerRegistry | None = None


def get_registry() -> LearnerRegistry:
    """The process-wide registry (created and loaded on first use)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = LearnerRegistry()
    return _REGISTRY


def available_learners() -> list[str]:
    """Sorted names of every registered learner."""
    return sorted(get_registry().learners())


def build_config(spec: LearnerSpec, learner_kwargs: dict[str, Any]) -> Any:
    """Instantiate ``spec.config_class`` from keyword arguments, naming any bad one."""
    fields = {field.name for field in dataclasses.fields(spec.config_class)}
    unknown = sorted(set(learner_kwargs) - fields)
    if unknown:
        raise TypeError(
            f"learner {spec.name!r} got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"its keyword arguments are: {', '.join(sorted(fields))}"
        )
    try:
        return spec.config_class(**learner_kwargs)
    except (TypeError, ValueError) as error:
        raise type(error)(f"learner {spec.name!r}: {error}") from error


def make_learner(
    name: str,
    input_size: int,
    *,
    streams: int = 1,
    independent_params: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    **learner_kwargs: Any,
) -> StateLearner:
    """Build a registered state learner.

    Args:
        name: registered learner name (see ``available_learners()``).
        input_size: size of each stream's input vector.
        streams: number of streams ``B`` stepped together.
        independent_params: one network per stream (``[B, ...]`` params) instead of one
            network shared by all streams (``[1, ...]``).
        dtype: ``torch.float32`` or ``torch.float64``.
        device: torch device of every tensor.
        seed: seed of the parameter initialisation (``None``: nondeterministic).
        **learner_kwargs: fields of the learner's config dataclass.

    Returns:
        The learner.

    Example:
        >>> import torch, agentstate
        >>> learner = agentstate.make_learner("columnar", 12, streams=4, n_features=7, seed=0)
        >>> learner.step(torch.zeros(4, 12)).shape
        torch.Size([4, 7])
    """
    spec = get_registry().spec(name)
    config = build_config(spec, learner_kwargs)
    return spec.learner_class(
        input_size,
        config,
        streams=streams,
        independent_params=independent_params,
        dtype=dtype,
        device=device,
        seed=seed,
    )


def learner_table() -> list[dict[str, Any]]:
    """Rows ``{name, distribution, exact, summary}`` for every registered learner."""
    return [
        {
            "name": name,
            "distribution": entry.distribution,
            "exact": entry.spec.exact,
            "summary": entry.spec.summary,
        }
        for name, entry in sorted(get_registry().learners().items())
    ]
