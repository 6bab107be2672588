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
