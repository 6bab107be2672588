"""The fused TD step (``agentstate.fused``) against the eager reference (``agentstate.td``).

Both implementations run the same stream of observations, cumulants, discounts and episode
starts. In float64 the predictions at every step and every tensor of the final ``state_dict``
agree to 1e-12 relative: the same math, rounding aside. In float32 the predictions agree to
1e-6 relative over hundreds of steps, and the state tensors (traces amplify rounding) differ
by less than float32 rounding already moves the eager path from its float64 twin, or stray
from that float64 twin no farther than twice that.
"""

import warnings

import pytest
import torch

import agentstate
from agentstate import fused
from agentstate.plugins.columnar import COLUMNS_KERNEL
from agentstate.td import TDConfig, TDPredictor

STREAMS, INPUTS = 3, 5

needs_kernel = pytest.mark.skipif(
    fused.load_kernel(COLUMNS_KERNEL) is None,
    reason="no C++ compiler: the fused kernel cannot be built",
)


def SLOW(value):  # noqa: N802 - reads as a marker
    """A parameter that runs in the full suite only (not in the fast lane)."""
    return pytest.param(value, marks=pytest.mark.expensive)


LEARNERS = {
    "columnar": {"n_features": 4},
    "ccn": {"n_features": 6, "columns_per_stage": 2, "steps_per_stage": 25},
    "tbptt": {"n_features": 4, "truncation": 3},
    "elstm": {"n_features": 4},
    "uoro": {"n_features": 4},
    "snap1": {"n_features": 4, "connection_density": 0.5},
}


def make_predictor(name, backend, dtype, independent=False, n_cumulants=1, **config):
    learner = agentstate.make_learner(
        name,
        INPUTS,
        streams=STREAMS,
        independent_params=independent,
        dtype=dtype,
        seed=3,
        **LEARNERS[name],
    )
    settings = {"step_size": 0.01, "head_step_size": 0.05, **config}
    return TDPredictor(learner, n_cumulants, TDConfig(backend=backend, **settings))


def stream_of_steps(steps, dtype, n_cumulants=1, seed=0, head_gammas=None):
    """Sparse binary observations, cumulants, per-stream discounts with episode ends.

    With ``head_gammas`` (one per cumulant) the discount is ``[B, K]``: the stream's
    continuation (0 at an episode end) times each head's own discount.
    """
    generator = torch.Generator().manual_seed(seed)
    for t in range(steps):
        observation = (torch.rand(STREAMS, INPUTS, generator=generator) < 0.3).to(dtype)
        cumulant = torch.rand(STREAMS, n_cumulants, generator=generator, dtype=dtype)
        discount = torch.full((STREAMS,), 0.9, dtype=dtype)
        start = None
        if t % 37 == 36:
            discount[t % STREAMS] = 0.0
        if t % 37 == 0 and t > 0:
            start = torch.arange(STREAMS) == (t - 1) % STREAMS
        if head_gammas is not None:
            continuation = discount / 0.9
            discount = continuation[:, None] * torch.tensor(head_gammas, dtype=dtype)[None]
        yield observation, cumulant, discount, start


def assert_relatively_close(actual, expected, tolerance, label):
    assert actual.shape == expected.shape, label
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), 1e-30)
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * scale, f"{label}: error {error:.3g} vs scale {scale:.3g}"


def assert_same_state(actual, expected, tolerance, label="state"):
    if isinstance(expected, torch.Tensor):
        if expected.dtype.is_floating_point:
            assert_relatively_close(actual, expected, tolerance, label)
        else:
            assert torch.equal(actual, expected), label
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), label
        for key in expected:
            if key not in ("config", "generator"):
                assert_same_state(actual[key], expected[key], tolerance, f"{label}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), label
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_state(a, e, tolerance, f"{label}[{index}]")
    else:
        assert actual == expected, label


def run(predictor, steps, dtype, n_cumulants=1):
    """Predictions ``[steps, B, K]`` (float64) of ``predictor`` on ``stream_of_steps``."""
    predictions = []
    for x, c, discount, start in stream_of_steps(steps, torch.float64, n_cumulants):
        x, c, discount = x.to(dtype), c.to(dtype), discount.to(dtype)
        predictions.append(predictor.step(x, c, discount=discount, episode_start=start).double())
    return torch.stack(predictions)


def run_both(name, steps, **options):
    """Run eager and fused in float64 side by side; check every step and the final state."""
    head_gammas = options.pop("head_gammas", None)
    predictors = {
        backend: make_predictor(name, backend, torch.float64, **options)
        for backend in ("eager", "fused")
    }
    assert predictors["eager"].backend == "eager" and predictors["fused"].backend == "fused"
    n_cumulants = options.get("n_cumulants", 1)
    steps_in = stream_of_steps(steps, torch.float64, n_cumulants, head_gammas=head_gammas)
    for t, (x, c, discount, start) in enumerate(steps_in):
        eager = predictors["eager"].step(x, c, discount=discount, episode_start=start)
        fast = predictors["fused"].step(x, c, discount=discount, episode_start=start)
        assert_relatively_close(fast, eager, 1e-12, f"prediction at step {t}")
    assert_same_state(predictors["fused"].state_dict(), predictors["eager"].state_dict(), 1e-12)
    return predictors


def float_tensors(state, label="state"):
    """``{label: tensor}`` of every floating-point tensor in a nested ``state_dict``."""
    found = {}
    if isinstance(state, torch.Tensor):
        if state.dtype.is_floating_point and state.numel():
            found[label] = state.double()
    elif isinstance(state, dict):
        for key, value in state.items():
            if key not in ("config", "generator"):
                found.update(float_tensors(value, f"{label}.{key}"))
    elif isinstance(state, list | tuple):
        for index, value in enumerate(state):
            found.update(float_tensors(value, f"{label}[{index}]"))
    return found


@needs_kernel
@pytest.mark.parametrize("optimizer", [SLOW("sgd"), "rmsprop_td", SLOW("adam")])
@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_fused_step_matches_eager(name, independent, optimizer):
    run_both(name, 120, independent=independent, optimizer=optimizer)


@needs_kernel
@pytest.mark.parametrize("name", sorted(LEARNERS))
@pytest.mark.parametrize(
    "options",
    [
        {"n_cumulants": 2, "include_observation": True},
        {"include_bias": False, "normalize_inputs": False, "normalize_features": False},
        {"train_learner": False},
        {"lambda_": 0.0, "normalization_decay": 0.9},
        {"n_cumulants": 3, "head_gammas": (0.9, 0.0, 0.5)},  # a discount per head
        {"n_cumulants": 2, "head_gammas": (0.0, 0.7), "independent": True},
    ],
)
def test_fused_step_matches_eager_in_every_setting(name, options):
    run_both(name, 80, **options)


@needs_kernel
@pytest.mark.parametrize("optimizer", ["rmsprop_td", SLOW("adam")])
@pytest.mark.parametrize("name", [n if n == "columnar" else SLOW(n) for n in sorted(LEARNERS)])
def test_float32_agrees_to_a_millionth_and_to_float32_rounding(name, optimizer):
    steps = 400
    reference = make_predictor(name, "eager", torch.float64, optimizer=optimizer)
    eager = make_predictor(name, "eager", torch.float32, optimizer=optimizer)
    fast = make_predictor(name, "fused", torch.float32, optimizer=optimizer)
    expected = run(eager, steps, torch.float32)
    got = run(fast, steps, torch.float32)
    for t in range(steps):
        assert_relatively_close(got[t], expected[t], 1e-6, f"prediction at step {t}")
    run(reference, steps, torch.float64)
    exact = float_tensors(reference.state_dict())
    eager_state, fused_state = float_tensors(eager.state_dict()), float_tensors(fast.state_dict())
    for label, truth in exact.items():
        scale = truth.abs().max().item()
        rounding = max((eager_state[label] - truth).abs().max().item(), 1e-6 * scale)
        difference = (fused_state[label] - eager_state[label]).abs().max().item()
        # Either the two float32 runs stay together, or (a recurrence such as eLSTM's carries
        # each run's last-bit differences off on its own walk) the fused one strays from the
        # float64 truth no farther than float32 rounding takes the eager one (2x: two walks).
        fused_rounding = (fused_state[label] - truth).abs().max().item()
        assert difference <= rounding or fused_rounding <= 2 * rounding, label


@needs_kernel
def test_ccn_stages_advance_identically():
    predictors = run_both("ccn", 80)  # three stages of 25 steps, then the last
    for predictor in predictors.values():
        assert predictor.learner.active_stage == 2
        assert predictor.learner.steps_in_stage == 30
        trained = predictor.optimizer.param_groups[1]["params"][0]
        assert trained is predictor.learner.params["weight"]


@needs_kernel
@pytest.mark.parametrize("load_into", ["eager", "fused"])
def test_state_dicts_move_between_backends(load_into):
    source = make_predictor("columnar", "fused" if load_into == "eager" else "eager", torch.float64)
    steps = list(stream_of_steps(40, torch.float64))
    for x, c, discount, start in steps[:20]:
        source.step(x, c, discount=discount, episode_start=start)
    target = make_predictor("columnar", load_into, torch.float64)
    target.load_state_dict(source.state_dict())
    for x, c, discount, start in steps[20:]:
        expected = source.step(x, c, discount=discount, episode_start=start)
        got = target.step(x, c, discount=discount, episode_start=start)
        assert_relatively_close(got, expected, 1e-12, "prediction after loading")


def replace_carry(predictor):
    h, c_state = predictor.learner.carry
    predictor.learner.carry = (0.5 * h, c_state.clone())


def replace_trace(predictor):
    (key,) = predictor.learner_traces
    predictor.learner_traces[key] = 0.5 * predictor.learner_traces[key]


def replace_optimizer_state(predictor):
    state = predictor.optimizer.state[predictor.learner.params["weight"]]
    state["second_moment"] = 2.0 * state["second_moment"]


def replace_normalizer_mean(predictor):
    predictor.input_normalizer.mean = predictor.input_normalizer.mean + 0.25


@needs_kernel
@pytest.mark.parametrize(
    "replace", [replace_carry, replace_trace, replace_optimizer_state, replace_normalizer_mean]
)
def test_fused_step_follows_tensors_replaced_from_outside(replace):
    """A tensor assigned by other code (a wrapper, a test) is what the next step reads."""
    eager = make_predictor("tbptt", "eager", torch.float64, optimizer="rmsprop_td")
    fast = make_predictor("tbptt", "fused", torch.float64, optimizer="rmsprop_td")
    for t, (x, c, discount, _) in enumerate(stream_of_steps(30, torch.float64)):
        if t == 15:
            replace(eager)
            replace(fast)
        expected = eager.step(x, c, discount=discount)
        assert_relatively_close(fast.step(x, c, discount=discount), expected, 1e-12, f"step {t}")


@needs_kernel
def test_non_contiguous_inputs_and_float_discounts():
    eager = make_predictor("columnar", "eager", torch.float32)
    fast = make_predictor("columnar", "fused", torch.float32)
    for x, c, _, _ in stream_of_steps(20, torch.float32):
        x_strided = x.t().contiguous().t()  # same values, column-major
        expected = eager.step(x, c, discount=0.8)
        assert_relatively_close(fast.step(x_strided, c, discount=0.8), expected, 1e-6, "step")


@needs_kernel
def test_non_finite_input_is_refused_and_changes_nothing():
    predictor = make_predictor("columnar", "fused", torch.float32)
    x, c, _, _ = next(stream_of_steps(1, torch.float32))
    predictor.step(x, c)
    before = predictor.state_dict()
    bad = x.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="observation holds a non-finite value"):
        predictor.step(bad, c)
    with pytest.raises(ValueError, match="discount holds a non-finite value"):
        predictor.step(x, c, discount=torch.full((STREAMS,), float("nan")))
    assert_same_state(predictor.state_dict(), before, 0.0)


@needs_kernel
def test_a_refused_step_leaves_the_random_signs_undrawn():
    """UORO draws its signs before the kernel checks the inputs; a refusal puts them back."""
    eager = make_predictor("uoro", "eager", torch.float64)
    fast = make_predictor("uoro", "fused", torch.float64)
    steps = list(stream_of_steps(10, torch.float64))
    for t, (x, c, discount, start) in enumerate(steps):
        if t == 5:
            bad = x.clone()
            bad[0, 0] = float("nan")
            for predictor in (eager, fast):
                with pytest.raises(ValueError, match="non-finite"):
                    predictor.step(bad, c, discount=discount)
        expected = eager.step(x, c, discount=discount, episode_start=start)
        got = fast.step(x, c, discount=discount, episode_start=start)
        assert_relatively_close(got, expected, 1e-12, f"prediction at step {t}")
    assert torch.equal(fast.learner.generator.get_state(), eager.learner.generator.get_state())


def test_backend_choice():
    auto = make_predictor("columnar", "auto", torch.float32)
    assert auto.backend == ("fused" if fused.load_kernel(COLUMNS_KERNEL) else "eager")
    assert make_predictor("columnar", "eager", torch.float32).backend == "eager"
    learner = agentstate.make_learner("rtrl", INPUTS, streams=STREAMS, seed=0)
    assert TDPredictor(learner, 1, TDConfig()).backend == "eager"
    with pytest.raises(ValueError, match="backend='fused' cannot run this predictor"):
        TDPredictor(learner, 1, TDConfig(backend="fused"))
    with pytest.raises(ValueError, match="backend"):
        TDConfig(backend="jit")


def test_a_proxy_that_intercepts_step_gets_the_eager_path():
    class Recorder:
        def __init__(self, learner):
            self.learner = learner
            self.steps = 0

        def step(self, x):
            self.steps += 1
            return self.learner.step(x)

        def __getattr__(self, name):
            return getattr(self.learner, name)

    recorder = Recorder(agentstate.make_learner("columnar", INPUTS, streams=STREAMS, seed=0))
    predictor = TDPredictor(recorder, 1, TDConfig())  # type: ignore[arg-type]
    predictor.step(torch.zeros(STREAMS, INPUTS), torch.zeros(STREAMS, 1))
    assert predictor.backend == "eager" and recorder.steps == 1


def test_without_a_compiler_one_warning_and_the_eager_path(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "_compiler", lambda: None)
    monkeypatch.setenv("AGENTSTATE_CACHE_DIR", str(tmp_path))
    fused.load_kernel.cache_clear()
    try:
        with pytest.warns(fused.FusedKernelWarning, match="no C\\+\\+ compiler"):
            predictor = make_predictor("columnar", "auto", torch.float32)
        assert predictor.backend == "eager"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not on every predictor
            assert make_predictor("columnar", "auto", torch.float32).backend == "eager"
        with pytest.raises(ValueError, match="could not be built"):
            make_predictor("columnar", "fused", torch.float32)
    finally:
        fused.load_kernel.cache_clear()


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    broken = tmp_path / "engine.h"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(fused, "ENGINE_HEADER", broken)
    monkeypatch.setenv("AGENTSTATE_CACHE_DIR", str(tmp_path))
    fused.load_kernel.cache_clear()
    try:
        if fused._compiler() is None:
            pytest.skip("no C++ compiler")
        with pytest.warns(fused.FusedKernelWarning, match="failed"):
            assert make_predictor("columnar", "auto", torch.float32).backend == "eager"
    finally:
        fused.load_kernel.cache_clear()


@needs_kernel
@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_every_thread_count_gives_bitwise_the_same_steps(name, independent, monkeypatch):
    """Threads split columns, weight rows or streams, never a sum: results are identical."""
    monkeypatch.setattr(fused, "PARALLEL_GRAIN", 1)  # the tiny test network earns threads
    threads = torch.get_num_threads()
    runs = {}
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            predictor = make_predictor(name, "fused", torch.float32, independent, n_cumulants=2)
            predictions = run(predictor, 60, torch.float32, n_cumulants=2)
            runs[count] = (predictions, float_tensors(predictor.state_dict()))
    finally:
        torch.set_num_threads(threads)
    for count in (2, 3):
        assert torch.equal(runs[count][0], runs[1][0]), f"predictions with {count} threads"
        assert runs[count][1].keys() == runs[1][1].keys()
        for label, tensor in runs[1][1].items():
            assert torch.equal(runs[count][1][label], tensor), f"{label} with {count} threads"


@pytest.mark.expensive
def test_without_vector_math_the_scalar_build_runs_the_same_kernel(monkeypatch, tmp_path):
    if fused._compiler() is None or not fused._vector_math_possible():
        pytest.skip("no C++ compiler, or no vector math library to do without on this platform")
    monkeypatch.setattr(fused, "VECTOR_MATH_LIBRARIES", ("-lagentstate_no_such_library",))
    monkeypatch.setenv("AGENTSTATE_CACHE_DIR", str(tmp_path))
    fused.load_kernel.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", fused.FusedKernelWarning)  # no warning: a quiet fallback
            assert fused.load_kernel(COLUMNS_KERNEL) is not None
        assert len(list((tmp_path / "kernels").glob("*.failed"))) == 1  # not retried next time
        fused.load_kernel.cache_clear()
        compilations = []
        real_run = fused.subprocess.run

        def counting_run(command, **options):
            if "-o" in command:
                compilations.append(command)
            return real_run(command, **options)

        monkeypatch.setattr(fused.subprocess, "run", counting_run)
        assert fused.load_kernel(COLUMNS_KERNEL) is not None
        assert compilations == []  # the next process neither retries nor rebuilds
        run_both("columnar", 40)
        run_both("tbptt", 40)
    finally:
        fused.load_kernel.cache_clear()


@pytest.mark.expensive
@needs_kernel
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("elstm", {"n_features": 60}),  # input + cells >= 64: the row-by-row output sweep
        ("tbptt", {"n_features": 4, "truncation": 11}),  # more ages than the unrolled sums
        ("tbptt", {"n_features": 70, "truncation": 3}),  # U^T sums over 280 rows per stream
        ("columnar", {"n_features": 700}),  # several chunks of columns per sweep
    ],
)
def test_large_shapes_take_their_own_loops_and_still_match_eager(name, options, monkeypatch):
    monkeypatch.setitem(LEARNERS, name, options)
    run_both(name, 30)


@needs_kernel
@pytest.mark.parametrize("independent", [False, True])
def test_long_input_rows_match_eager(independent):
    """Rows over 64 inputs take per-stream dot products in the forward pass."""
    generator = torch.Generator().manual_seed(1)
    predictors = {}
    for backend in ("eager", "fused"):
        learner = agentstate.make_learner(
            "columnar",
            70,
            streams=3,
            n_features=3,
            independent_params=independent,
            dtype=torch.float64,
            seed=2,
        )
        predictors[backend] = TDPredictor(learner, 1, TDConfig(backend=backend, step_size=0.01))
    for t in range(30):
        x = (torch.rand(3, 70, generator=generator) < 0.2).double()
        c = torch.rand(3, 1, generator=generator, dtype=torch.float64)
        eager, fast = (predictors[b].step(x, c) for b in ("eager", "fused"))
        assert_relatively_close(fast, eager, 1e-12, f"prediction at step {t}")
    assert_same_state(predictors["fused"].state_dict(), predictors["eager"].state_dict(), 1e-12)


def window_run(streams, backend, dtype, steps=50):
    """Predictions and final state of a shared-weight T-BPTT predictor on ``streams`` streams
    whose windows differ in length (every 7th stream restarts every 5 steps)."""
    learner = agentstate.make_learner(
        "tbptt", INPUTS, streams=streams, n_features=5, truncation=4, seed=1, dtype=dtype
    )
    predictor = TDPredictor(learner, 1, TDConfig(backend=backend, step_size=0.01))
    generator = torch.Generator().manual_seed(0)
    predictions = []
    for t in range(steps):
        x = (torch.rand(streams, INPUTS, generator=generator) < 0.3).to(dtype)
        c = torch.rand(streams, 1, generator=generator).to(dtype)
        start = torch.arange(streams) % 7 == t % 7 if t % 5 == 4 else None
        predictions.append(predictor.step(x, c, episode_start=start))
    return torch.stack(predictions), predictor


@needs_kernel
def test_window_across_streams_matches_eager():
    """Shared weights and >= 8 streams take the across-streams loops; 11 streams leave 3 that
    fill no vector."""
    fast, fast_predictor = window_run(11, "fused", torch.float64)
    eager, eager_predictor = window_run(11, "eager", torch.float64)
    assert_relatively_close(fast, eager, 1e-12, "predictions")
    assert_same_state(fast_predictor.state_dict(), eager_predictor.state_dict(), 1e-12)


@needs_kernel
def test_window_streams_in_blocks_of_any_width_give_bitwise_the_same_steps(monkeypatch):
    """T-BPTT with shared weights runs its streams in register tiles of whole vectors and
    single lanes: a stream's numbers must not depend on which tile it lands in (43 streams
    split over 1, 2 and 3 threads put them in every kind), nor on its neighbours' windows."""
    monkeypatch.setattr(fused, "PARALLEL_GRAIN", 1)
    threads = torch.get_num_threads()
    runs = {}
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            predictions, predictor = window_run(43, "fused", torch.float32)
            runs[count] = (predictions, float_tensors(predictor.state_dict()))
    finally:
        torch.set_num_threads(threads)
    for count in (2, 3):
        assert torch.equal(runs[count][0], runs[1][0]), f"predictions with {count} threads"
        for label, tensor in runs[1][1].items():
            assert torch.equal(runs[count][1][label], tensor), f"{label} with {count} threads"
