"""Sizes of the dense-LSTM learners that cost T-BPTT's FLOPs per step (15 units, k = 4).

A FLOP model of each rule as this package implements it (``plugins/tbptt.py``,
``plugins/uoro.py``, ``plugins/snap1.py``). With ``D = inputs + units + 1`` and ``P = 4 units D``
weights (a multiply-add is 2 FLOPs; O(units) element-wise terms are left out):

* forward ``W z``: ``2P``; state Jacobian ``d(h, c)_t / d(h, c)_t-1``: ``14 n^2``;
* T-BPTT: forward, then per window step the parameter VJP (outer product + accumulate,
  ``2P``), the state Jacobian and its transpose applied to the adjoints (``14 n^2 + 4 n^2``):
  ``2P + k (2P + 18 n^2)``;
* UORO: forward, state Jacobian + JVP of the state tangent (``18 n^2``), parameter VJP of the
  noise (``P``), two norms of weight-sized tensors (``4P``), the tangent update (``3P``),
  ``grad`` (``P``): ``11P + 18 n^2``;
* SnAp-1: the masked weights (``P``), forward (``2P``), the masked input (``P``), the two
  sensitivity updates (``5P`` each: one product and two multiply-adds per entry), ``grad``
  (``P``): ``15P`` (only the Jacobian's diagonal is used).

Run: ``python benchmarks/paper_comparison/compute_matching.py`` (prints the sizes; the sweep
spec ``fixed.toml`` uses them).
"""

from __future__ import annotations

OBSERVATION_SIZE = 12  # trace patterning, JMLR preset
TBPTT_UNITS, TBPTT_WINDOW = 15, 4


def dense_rule_flops(rule: str, units: int, inputs: int, window: int = TBPTT_WINDOW) -> int:
    """FLOPs per stream-step (``step`` + one ``grad``) of ``rule`` (module docstring)."""
    weights = 4 * units * (inputs + units + 1)
    state_jacobian = 18 * units * units
    if rule == "tbptt":
        return 2 * weights + window * (2 * weights + state_jacobian)
    if rule == "uoro":
        return 11 * weights + state_jacobian
    if rule == "snap1":
        return 15 * weights
    raise ValueError(f"no FLOP model for rule {rule!r}")


def units_matching_tbptt(rule: str) -> int:
    """The size of ``rule`` whose FLOPs per step are closest to T-BPTT 15, k = 4."""
    target = dense_rule_flops("tbptt", TBPTT_UNITS, OBSERVATION_SIZE)
    return min(
        range(1, 64),
        key=lambda units: abs(dense_rule_flops(rule, units, OBSERVATION_SIZE) - target),
    )


if __name__ == "__main__":
    print(
        f"T-BPTT {TBPTT_UNITS}, k={TBPTT_WINDOW}: "
        f"{dense_rule_flops('tbptt', TBPTT_UNITS, OBSERVATION_SIZE):,} FLOPs per step"
    )
    for rule in ("uoro", "snap1"):
        units = units_matching_tbptt(rule)
        flops = dense_rule_flops(rule, units, OBSERVATION_SIZE)
        print(f"{rule} {units} units: {flops:,} FLOPs per step")
