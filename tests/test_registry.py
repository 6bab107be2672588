"""The plugin registry: built-ins, third-party entry points, clear errors."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from oracle import bptt_gradient, relative_error

import agentstate
from agentstate.registry import LearnerRegistry

EXAMPLE_PLUGIN = Path(__file__).parents[1] / "examples" / "third_party_learner"


def test_builtin_learners_are_registered_through_the_entry_point_group():
    assert "columnar" in agentstate.available_learners()
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="agentstate") if ep.dist.name == "agentstate"}
    assert "columnar" in names


def test_unknown_learner_lists_the_known_ones():
    with pytest.raises(KeyError, match="known learners: .*columnar"):
        agentstate.make_learner("no-such-learner", 3)


def test_bad_kwarg_names_the_learner_and_the_kwarg():
    with pytest.raises(TypeError, match="'columnar'.*n_colums.*n_features"):
        agentstate.make_learner("columnar", 3, n_colums=4)
    with pytest.raises(ValueError, match="'columnar'.*n_features"):
        agentstate.make_learner("columnar", 3, n_features=0)


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (torch.zeros(2, 4), ValueError, r"shape \[2, 3\]"),
        (torch.zeros(2, 3, dtype=torch.float64), TypeError, "dtype"),
        (torch.tensor([[0.0, float("nan"), 0.0], [0, 0, 0]]), ValueError, "stream 0, component 1"),
        ([[0.0, 0.0, 0.0]] * 2, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_to_step_is_refused_clearly(x, error, message):
    learner = agentstate.make_learner("columnar", 3, streams=2)
    with pytest.raises(error, match=message):
        learner.step(x)


def test_a_plugin_that_fails_to_import_is_reported_and_the_others_load(monkeypatch):
    import importlib.metadata as metadata

    real_entry_points = metadata.entry_points

    class BrokenEntryPoint:
        name = "broken"
        dist = type("Dist", (), {"name": "broken-dist"})()

        def load(self):
            raise ImportError("boom")

    def entry_points(group):
        return [BrokenEntryPoint(), *real_entry_points(group=group)]

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    registry = LearnerRegistry()
    with pytest.warns(RuntimeWarning, match="'broken' from distribution 'broken-dist'"):
        names = registry.learners()
    assert "columnar" in names
    assert [failure.plugin for failure in registry.load_errors] == ["broken"]


@pytest.mark.expensive
def test_third_party_plugin_installs_and_is_listed(tmp_path):
    """pip-install the example plugin into a throwaway target and see it listed and exact."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE_PLUGIN),
        ],
        check=True,
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(target)!r})
        from agentstate.cli import main
        main(["learners"])
        """
    )
    listing = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    line = next(row for row in listing.splitlines() if row.startswith("leaky_echo"))
    assert "agentstate-example-learner" in line and " yes " in line

    sys.path.insert(0, str(target))
    try:
        from agentstate_example_learner.plugin import LeakyEcho, LeakyEchoConfig

        learner = LeakyEcho(
            3, LeakyEchoConfig(n_features=4), streams=2, dtype=torch.float64, seed=0
        )
        inputs = torch.randn(6, 2, 3, dtype=torch.float64)
        params = {k: p.clone() for k, p in learner.params.items()}
        for x in inputs:
            learner.step(x)
        v = torch.randn(2, 4, dtype=torch.float64)
        truth = bptt_gradient(learner, params, inputs, v)
        assert relative_error(learner.grad(v)["weight"], truth["weight"]) <= 1e-9
    finally:
        sys.path.remove(str(target))
