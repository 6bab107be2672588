"""``agentstate bench``: the naive reference is exact, and a quick run produces every table."""

import json

import pytest
import torch

import agentstate
from agentstate import benchmark
from agentstate.cli import main


def test_naive_reference_computes_the_columnar_gradient():
    options = {"streams": 3, "n_features": 5, "seed": 1, "init_scale": 0.5}
    columnar = agentstate.make_learner("columnar", 4, **options)
    naive = benchmark.NaiveColumnarRTRL(agentstate.make_learner("columnar", 4, **options))
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(3, 4, generator=generator)
        torch.testing.assert_close(naive.step(x), columnar.step(x))
    v = torch.randn(3, 5, generator=generator)
    torch.testing.assert_close(naive.grad(v)["weight"], columnar.grad(v)["weight"])


def test_step_bytes_count_each_array_once():
    n = 256 * 4 * 277
    assert benchmark.columnar_step_bytes(8, 256, 275) == 4 * (6 * 8 * n + 5 * n)


@pytest.mark.expensive
def test_quick_bench_writes_every_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert main(["bench", "--quick", "--json", str(tmp_path / "bench.json")]) == 0
    assert torch.get_num_threads() == threads  # restored
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {row["label"] for row in report["cases"]} >= {"columnar (32, 7, 12)"}
    assert all(row["fused_us"] > 0 and row["eager_us"] > 0 for row in report["cases"])
    batched = [row for row in report["cases"] if row["streams"] > 1 and row["target_us"]]
    assert batched and all(row["fused_independent_us"] > 0 for row in batched)
    assert {row["learner"] for row in report["scaling"]} == set(benchmark.SCALING)
    compiled = {row["learner"] for row in report["actor_critic"]}
    assert compiled == {"columnar", "ccn", "elstm", "rtu"}
    assert all(row["actor_critic_us"] > 0 and row["td_us"] > 0 for row in report["actor_critic"])
    out = capsys.readouterr().out
    assert "| case | params | target | fused | fused indep. |" in out
    assert "| learner | backend |" in out
    assert "| core | compiled | eager | TD step |" in out


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_the_gpu_eager_step_check_times_every_learner_and_writes_its_table(tmp_path, device):
    """benchmarks/gpu_eager_step.py, on a tiny budget (beside a GPU, the CPU is timed too)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu_eager_step.py"
    spec = importlib.util.spec_from_file_location("gpu_eager_step", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--device", device, "--streams", "2", "3", "--cpu-streams", "2", "--seconds", "0.01"]
    assert script.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(row["learner"], row["streams"]) for row in rows] == [
        (name, streams) for name in ("columnar", "elstm", "rtu", "ccn") for streams in (2, 3)
    ]
    assert all(row[f"{device}_us_per_stream_step"] > 0 for row in rows)
    if device == "cuda":
        assert [row["streams"] for row in rows if "cpu_us_per_step" in row] == [2] * 4
    assert (tmp_path / "results.md").read_text().count("\n| ") == 1 + len(rows)


def test_the_runner_benchmark_splits_every_case_into_its_parts(tmp_path):
    """benchmarks/bench_runner.py, on a tiny budget: every case, split into disjoint parts."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_runner.py"
    spec = importlib.util.spec_from_file_location("bench_runner", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--steps", "300", "--streams", "2", "--repeats", "1"]
    assert script.main([*argv, "--json", str(tmp_path / "runner.json")]) == 0
    timings = json.loads((tmp_path / "runner.json").read_text())["us_per_step"]
    assert list(timings) == list(script.CASES)
    for parts in timings.values():
        assert parts["td_step"] > 0 and parts["env"] > 0
        assert parts["td_step"] + parts["env"] < parts["total"]  # timed apart, inside the loop
