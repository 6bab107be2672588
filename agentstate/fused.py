"""The fused TD(lambda) step: ``TDPredictor.step`` for every stream in one compiled call.

The eager step (``agentstate.td``) is a few hundred small tensor ops; at the sizes this field
works at (a few columns, a dozen inputs, tens of streams) each op's fixed cost of a few µs is
the whole bill. ``fused_td.cpp`` does the same step -- normalisation, the learner's forward
and credit assignment, heads, TD error, optimiser steps, traces -- as plain loops over
streams, columns and inputs, reading and writing every large array once. It is compiled at
first use with the system C++ compiler into a user cache directory and called through
``ctypes``; it has no dependency on torch's headers, so it builds in a few seconds. Without a
compiler, or if the build fails, one warning is issued and the eager path runs.

The kernel works in place on the very tensors the eager path uses (learner parameters,
carry, sensitivities or window, traces, heads, normaliser statistics, optimiser state), so
``state_dict``, ``reset_streams`` and a later eager step see exactly what the kernel did.
Learners opt in with a ``fused_layout()`` method returning a ``ColumnStages`` (columnar, CCN),
a ``DenseWindow`` (T-BPTT), an ``ElementwiseCells`` (eLSTM), a ``DenseTangent`` (UORO) or an
``OwnUnitSensitivities`` (SnAp-1) that names those tensors; the last three are stepped by
``fused_dense.cpp``.

Threads: a step uses up to ``torch.get_num_threads()`` threads, the knob torch users already
set, and only once it is large enough to pay for them (``PARALLEL_GRAIN``); every thread count
gives bitwise the same result.

Numerics follow the eager op order element by element (the kernel is compiled without
contracting multiply-adds); sums over inputs, streams and gates may round differently in the
last bit, so float32 results agree to ~1e-6 relative, float64 results to ~1e-12.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from agentstate.optim import optimizer_state

if TYPE_CHECKING:
    from agentstate.td import TDPredictor

SOURCE = Path(__file__).with_name("fused_td.cpp")
DENSE_SOURCE = Path(__file__).with_name("fused_dense.cpp")
"""The other learners' entry points (eLSTM, UORO, SnAp-1), compiled after ``SOURCE`` in the
same translation unit: they use its engine, optimisers and thread helpers."""
COMPILER_FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fopenmp-simd",
    "-pthread",
    "-std=c++17",
    "-shared",
    "-fPIC",
)
"""``-ffp-contract=off``: every multiply and add rounds on its own, as the eager ops do;
``-fno-math-errno`` lets ``sqrt`` vectorise; ``-fopenmp-simd`` honours the ``omp simd``
reductions (dot products) without an OpenMP runtime; ``-pthread``: large steps run on
several threads (``std::thread``)."""

PARALLEL_GRAIN = 1 << 20
"""Least work (parameter-stream entries of the sweep) that earns a step another thread.

Starting and joining a thread costs ~20-50 µs, several times per step; measured on 2 cores,
a second thread slows steps of ~4e5 entries (~0.15 ms) and speeds up steps of ~6e6 entries
(~4 ms) 1.6-1.9x, so a thread needs ~1e6 entries of its own. The split never
changes the numbers (see ``fused_td.cpp``), only the time."""

X86_FLAGS = ("-mprefer-vector-width=256",)
"""x86-64 only: rows of 12-20 entries (the small networks this field runs) fill 256-bit
vectors better than 512-bit ones (measured 1.1-1.3x faster at 1e3 parameters on an AVX-512
machine, equal at 1e6)."""

VECTOR_MATH = ("-DAGENTSTATE_LIBMVEC",)
VECTOR_MATH_LIBRARIES = ("-lmvec",)
"""glibc's vector math library: ``exp`` and ``tanh`` of the gates vectorise across streams
(columns) or units (T-BPTT). Tried first on x86-64 Linux; a toolchain without it builds the
kernel with scalar libm calls instead."""

OPTIMIZER_KINDS = {"sgd": 0, "rmsprop_td": 1, "adam": 2}


class FusedKernelWarning(UserWarning):
    """The fused kernel could not be built or loaded; the eager path runs instead."""


# ---------------------------------------------------------------------- what learners expose
class ColumnStages(NamedTuple):
    """Tensors of a columnar or CCN learner that the fused step advances in place.

    A columnar network is one stage whose columns all learn. ``P`` is 1 (shared) or ``B``;
    ``L`` columns per stage; ``k`` the active (last built) stage; ``T`` columns in all.
    """

    weights: Sequence[Tensor]
    """Built stages ``s = 0..k``: ``[P, L, 4, d + sL + 2]``; the last is trained."""
    input_mean: Sequence[Tensor]
    """``input_mean[s]``: ``[P, d]`` statistics with which stage ``s`` normalises the raw
    input, one per built stage; empty when the learner reads the engine's normalised input."""
    input_variance: Sequence[Tensor]
    """Like ``input_mean``."""
    feature_mean: Sequence[Tensor]
    """``feature_mean[s]``: ``[P, sL]`` statistics of the earlier columns' states that stage
    ``s`` reads; needed for the stages ``s >= 1`` (a columnar network passes none)."""
    feature_variance: Sequence[Tensor]
    """Like ``feature_mean``."""
    carry: tuple[Tensor, ...]
    """``(h, c)``, each ``[B, T]``."""
    sensitivity_h: Tensor
    """``[B, L, 4, d + kL + 2]``."""
    sensitivity_c: Tensor
    """Like ``sensitivity_h``."""
    columns_per_stage: int
    normalize_features: bool
    normalization_rate: float
    variance_floor: float
    step_taken: Callable[[], None] | None = None
    """Called after the kernel advanced the learner by one step (CCN counts its steps)."""

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the kernel touches, for ``FusedTDStep``'s identity check."""
        return (
            *self.weights,
            *self.input_mean,
            *self.input_variance,
            *self.feature_mean,
            *self.feature_variance,
            *self.carry,
            self.sensitivity_h,
            self.sensitivity_c,
        )

    def agent_state(self) -> Tensor:
        """``h: [B, T]`` of every built column after the last fused step."""
        return self.carry[0]


class DenseWindow(NamedTuple):
    """Tensors of a T-BPTT learner (``agentstate.plugins.tbptt``) advanced in place."""

    weight: Tensor
    """``[P, 4, n, d + n + 1]``."""
    carry: tuple[Tensor, ...]
    """``(h, c)``, each ``[B, n]``."""
    window_cell_input: Tensor
    window_dc_dpreactivation: Tensor
    window_dh_dpreactivation: Tensor
    window_dc_dc_prev: Tensor
    window_dh_dc: Tensor
    steps_in_window: Tensor
    """``[B]`` int64."""
    truncation: int
    step_taken: Callable[[], None] | None = None

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the kernel touches, for ``FusedTDStep``'s identity check."""
        return (self.weight, *self.carry, *self[2:8])

    def agent_state(self) -> Tensor:
        """``h: [B, n]`` after the last fused step."""
        return self.carry[0]


class ElementwiseCells(NamedTuple):
    """Tensors of an eLSTM learner (``agentstate.plugins.elstm``) advanced in place.

    ``P`` is 1 (shared) or ``B``; ``N`` cells, ``D`` inputs. Its five parameters are named
    here in the kernel's order; each has its own trace and optimiser state.
    """

    gate_input_weight: Tensor
    """``[P, 2, N, D]``: ``W_z, W_f``."""
    gate_cell_weight: Tensor
    """``[P, 2, N]``: ``w_z, w_f``."""
    gate_bias: Tensor
    """``[P, 2, N]``."""
    output_weight: Tensor
    """``[P, N, D + N]``: ``W_o`` on ``[x_t; c_t]``."""
    output_bias: Tensor
    """``[P, N]``."""
    carry: tuple[Tensor, ...]
    """``(c,)``, ``[B, N]``."""
    sensitivity: Tensor
    """``[B, 2, N, D + 2]``: row ``n`` of gate ``g`` is ``dc_n / d[W_g[n], w_g[n], b_g[n]]``."""
    output_gate: Tensor
    """``[B, N]``, written with this step's ``o_t``."""
    last_input: Tensor
    """``[B, D]``, written with this step's (normalised) input."""
    step_taken: Callable[[], None] | None = None

    def parameters(self) -> tuple[Tensor, ...]:
        """The learner's parameters in the kernel's order."""
        return tuple(self[:5])

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the kernel touches, for ``FusedTDStep``'s identity check."""
        return (*self[:5], *self.carry, self.sensitivity, self.output_gate, self.last_input)

    def agent_state(self) -> Tensor:
        """``h = o (.) c: [B, N]`` after the last fused step (a new tensor)."""
        return self.output_gate * self.carry[0]


class DenseTangent(NamedTuple):
    """Tensors of a UORO learner (``agentstate.plugins.uoro``) advanced in place."""

    weight: Tensor
    """``[P, 4, n, d + n + 1]``."""
    carry: tuple[Tensor, ...]
    """``(h, c)``, each ``[B, n]``."""
    state_tangent_h: Tensor
    """``[B, n]``."""
    state_tangent_c: Tensor
    """``[B, n]``."""
    parameter_tangent: Tensor
    """``[B, 4, n, d + n + 1]``."""
    sign_bits: Tensor
    """``[B, 2n]`` int64, 0 or 1: this step's random signs ``nu = 2 bits - 1``, drawn from the
    learner's generator by ``fused_layout`` exactly as its eager step draws them."""
    epsilon: float
    step_taken: Callable[[], None] | None = None
    step_refused: Callable[[], None] | None = None
    """Called when the kernel refused the step (non-finite inputs): un-draws the signs."""
    draw_signs: Callable[[], None] | None = None
    """Called right before the kernel: fills ``sign_bits`` with this step's signs."""

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the kernel touches, for ``FusedTDStep``'s identity check."""
        return (self.weight, *self.carry, *self[2:6])

    def agent_state(self) -> Tensor:
        """``h: [B, n]`` after the last fused step."""
        return self.carry[0]


class OwnUnitSensitivities(NamedTuple):
    """Tensors of a SnAp-1 learner (``agentstate.plugins.snap1``) advanced in place."""

    weight: Tensor
    """``[P, 4, n, d + n + 1]``; the network uses ``weight * weight_mask``."""
    carry: tuple[Tensor, ...]
    """``(h, c)``, each ``[B, n]``."""
    sensitivity_h: Tensor
    """``[B, 4, n, d + n + 1]``."""
    sensitivity_c: Tensor
    """Like ``sensitivity_h``."""
    weight_mask: Tensor
    """``[1, 1, n, d + n + 1]``, 0 or 1 (read only)."""
    step_taken: Callable[[], None] | None = None

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the kernel touches, for ``FusedTDStep``'s identity check."""
        return (self.weight, *self.carry, self.sensitivity_h, self.sensitivity_c, self.weight_mask)

    def agent_state(self) -> Tensor:
        """``h: [B, n]`` after the last fused step."""
        return self.carry[0]


Layout = ColumnStages | DenseWindow | ElementwiseCells | DenseTangent | OwnUnitSensitivities


# ---------------------------------------------------------------------- the C interface
class OptimizerArgs(ctypes.Structure):
    """Hyper-parameters shared by the heads' and the learner's parameter groups."""

    _fields_ = [
        ("kind", ctypes.c_int64),
        ("step_is_double", ctypes.c_int64),
        ("beta", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
    ]


class TDArgs(ctypes.Structure):
    """Sizes, settings and tensors of the engine; pointers address contiguous tensors."""

    _fields_ = [
        *(
            (name, ctypes.c_int64)
            for name in (
                "streams",
                "param_streams",
                "input_size",
                "n_features",
                "n_cumulants",
                "n_head_features",
                "include_observation",
                "include_bias",
                "train_learner",
                "threads",
                "parallel_grain",
            )
        ),
        *(
            (name, ctypes.c_double)
            for name in (
                "gamma",
                "lambda_",
                "learner_lr",
                "head_lr",
                "input_decay",
                "input_floor",
                "feature_decay",
                "feature_floor",
            )
        ),
        ("optimizer", OptimizerArgs),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "x",
                "cumulant",
                "discount",
                "prediction",
                "previous_prediction",
                "has_previous",
                "input_mean",
                "input_variance",
                "feature_mean",
                "feature_variance",
                "head_weight",
                "head_trace",
                "head_state_a",
                "head_state_b",
                "head_step",
                "learner_trace",
                "learner_state_a",
                "learner_state_b",
                "learner_step",
            )
        ),
    ]


class ColumnArgs(ctypes.Structure):
    """``ColumnStages`` for the kernel; ``stage_*`` point at arrays of per-stage pointers."""

    _fields_ = [
        ("columns_per_stage", ctypes.c_int64),
        ("active_stage", ctypes.c_int64),
        ("normalize_inputs", ctypes.c_int64),
        ("normalize_features", ctypes.c_int64),
        ("normalization_rate", ctypes.c_double),
        ("variance_floor", ctypes.c_double),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "h",
                "c",
                "sensitivity_h",
                "sensitivity_c",
                "stage_weights",
                "stage_input_means",
                "stage_input_variances",
                "stage_means",
                "stage_variances",
            )
        ),
    ]


class WindowArgs(ctypes.Structure):
    """``DenseWindow`` for the kernel."""

    _fields_ = [
        ("truncation", ctypes.c_int64),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "weight",
                "h",
                "c",
                "window_cell_input",
                "window_dc_dpreactivation",
                "window_dh_dpreactivation",
                "window_dc_dc_prev",
                "window_dh_dc",
                "steps_in_window",
            )
        ),
    ]


class ElementwiseArgs(ctypes.Structure):
    """``ElementwiseCells`` for the kernel.

    ``parameters`` and ``parameter_*`` point at arrays of five pointers, one per parameter in
    ``ElementwiseCells.parameters`` order.
    """

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in (
            "c",
            "sensitivity",
            "output_gate",
            "last_input",
            "parameters",
            "parameter_traces",
            "parameter_states_a",
            "parameter_states_b",
            "parameter_steps",
        )
    ]


class TangentArgs(ctypes.Structure):
    """``DenseTangent`` for the kernel."""

    _fields_ = [
        ("epsilon", ctypes.c_double),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "weight",
                "h",
                "c",
                "state_tangent_h",
                "state_tangent_c",
                "parameter_tangent",
                "sign_bits",
            )
        ),
    ]


class SnapArgs(ctypes.Structure):
    """``OwnUnitSensitivities`` for the kernel."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in ("weight", "h", "c", "sensitivity_h", "sensitivity_c", "weight_mask")
    ]


_C_TYPES = {ctypes.c_int64: "int64_t", ctypes.c_double: "double", ctypes.c_void_p: "void*"}


def c_declarations() -> str:
    """The C++ structs matching the ``ctypes`` ones, prepended to the kernel source."""
    lines = []
    structs = (
        OptimizerArgs,
        TDArgs,
        ColumnArgs,
        WindowArgs,
        ElementwiseArgs,
        TangentArgs,
        SnapArgs,
    )
    for struct in structs:
        lines.append(f"struct {struct.__name__} {{")
        for name, field_type, *_ in struct._fields_:
            c_type = _C_TYPES.get(field_type, field_type.__name__)
            lines.append(f"  {c_type} {name};")
        lines.append("};")
    return "#include <cstdint>\n" + "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- build and load
def cache_directory() -> Path:
    """Where built kernels are kept.

    ``$AGENTSTATE_CACHE_DIR``, else ``$XDG_CACHE_HOME/agentstate``, else ``~/.cache/agentstate``.
    """
    if os.environ.get("AGENTSTATE_CACHE_DIR"):
        return Path(os.environ["AGENTSTATE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "agentstate"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _machine_signature() -> str:
    """CPU model and instruction-set flags: ``-march=native`` builds are per machine kind."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(wanted))


def _build(compiler: str, vector_math: bool = False) -> Path:
    """Compile the kernel into the cache (once per source, compiler, flags and machine kind).

    ``SOURCE`` and ``DENSE_SOURCE`` are one translation unit, in that order.
    """
    source = c_declarations() + SOURCE.read_text() + DENSE_SOURCE.read_text()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    flags = (*COMPILER_FLAGS, *(X86_FLAGS if _is_x86_64() else ()))
    if vector_math:
        flags += VECTOR_MATH
    libraries = VECTOR_MATH_LIBRARIES if vector_math else ()
    key = hashlib.sha256(
        "\0".join([source, version, *flags, *libraries, _machine_signature()]).encode()
    ).hexdigest()[:16]
    library = cache_directory() / "kernels" / f"fused_td-{key}.so"
    if library.exists():
        return library
    failed = library.with_suffix(".failed")  # see _build_best
    if failed.exists():
        raise BuildError(failed.read_text(), library)
    directory = library.parent
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        source_path = Path(scratch) / "fused_td.cpp"
        source_path.write_text(source)
        built = Path(scratch) / library.name
        result = subprocess.run(
            [compiler, *flags, str(source_path), "-o", str(built), *libraries],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise BuildError(f"{compiler} failed: {result.stderr.strip()[-2000:]}", library)
        os.replace(built, library)  # atomic: concurrent builders never see half a file
    return library


def _is_x86_64() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def _vector_math_possible() -> bool:
    """Whether to try glibc's libmvec: x86-64 Linux only (its ABI names are per ISA)."""
    return platform.system() == "Linux" and _is_x86_64()


class BuildError(RuntimeError):
    """The compiler refused the kernel; ``library`` is where it would have gone."""

    def __init__(self, message: str, library: Path) -> None:
        super().__init__(message)
        self.library = library


def _build_best(compiler: str) -> Path:
    """The kernel with vector math where the toolchain has it, else without.

    When the vector-math build fails but the plain one succeeds, the toolchain lacks the
    vector library: a ``.failed`` note beside the would-be library sends later processes
    straight to the plain build (a source error fails both and is not remembered).
    """
    if not _vector_math_possible():
        return _build(compiler)
    try:
        return _build(compiler, vector_math=True)
    except BuildError as vector_failure:
        library = _build(compiler)
        vector_failure.library.with_suffix(".failed").write_text(str(vector_failure))
        return library


ENTRY_POINTS = {
    "td_columns": ColumnArgs,
    "td_window": WindowArgs,
    "td_elstm": ElementwiseArgs,
    "td_uoro": TangentArgs,
    "td_snap1": SnapArgs,
}
"""Kernel entry points (``<name>_float32``, ``<name>_float64``) and their learner arguments."""


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (with one warning) if that fails."""
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
        library = ctypes.CDLL(str(_build_best(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        warnings.warn(
            f"agentstate: fused TD kernel unavailable ({reason}); using the eager path",
            FusedKernelWarning,
            stacklevel=3,
        )
        return None
    for name, args_type in ENTRY_POINTS.items():
        for dtype in ("float32", "float64"):
            entry = getattr(library, f"{name}_{dtype}")
            entry.argtypes = [ctypes.POINTER(TDArgs), ctypes.POINTER(args_type)]
            entry.restype = ctypes.c_int
    return library


# ---------------------------------------------------------------------- applicability
def unsupported_reason(predictor: TDPredictor) -> str | None:
    """Why the fused step cannot run this predictor (None: it can, given a compiled kernel)."""
    learner = predictor.learner
    if learner.device.type != "cpu":
        return f"device {learner.device} (the fused kernel is CPU-only)"
    if learner.dtype not in (torch.float32, torch.float64):
        return f"dtype {learner.dtype}"
    # Asked of the class: a proxy that forwards attributes but intercepts ``step`` (to record
    # the state, say) must not be bypassed by a kernel it never sees.
    if not callable(getattr(type(learner), "fused_layout", None)):
        return f"{type(learner).__name__} has no fused kernel (no fused_layout method)"
    groups = predictor.optimizer.param_groups
    name = predictor.config.optimizer
    settings = [_optimizer_settings(name, group) for group in groups]
    if any(setting is None for setting in settings):
        return f"optimizer {name!r} with non-default settings"
    if len(set(settings)) != 1:
        return "parameter groups with different optimizer settings"
    return None


def _optimizer_settings(name: str, group: dict[str, Any]) -> tuple[float, ...] | None:
    """The hyper-parameters the kernel implements, or None for a setting it does not."""
    if any(group.get(flag) for flag in ("maximize", "differentiable", "capturable", "fused")):
        return None
    if name == "sgd":
        plain = group["momentum"] == 0 and group["weight_decay"] == 0 and not group["nesterov"]
        return () if plain else None
    if name == "rmsprop_td":
        return (group["beta"], group["eps"])
    if group["weight_decay"] != 0 or group["amsgrad"] or group.get("decoupled_weight_decay"):
        return None
    beta1, beta2 = group["betas"]
    return (float(beta1), float(beta2), group["eps"])


# ---------------------------------------------------------------------- the fused step
# The predictor's tensors the kernel binds (and the optimiser, whose state it binds).
_PREDICTOR_TENSORS = operator.attrgetter(
    "optimizer",
    "optimizer.state",
    "previous_prediction",
    "has_previous",
    "input_normalizer.mean",
    "input_normalizer.variance",
    "feature_normalizer.mean",
    "feature_normalizer.variance",
    "head_weight",
    "head_trace",
)


class FusedTDStep:
    """Runs ``TDPredictor.step``'s work for one predictor through the compiled kernel.

    The kernel's view of the tensors (their addresses) is rebuilt whenever any of them is
    replaced: by ``learner.reset`` (a new carry), a CCN stage change (new parameters, traces
    and optimiser), ``load_state_dict`` (new optimiser state), or any code that assigns one.
    Checking that costs ~1-2 µs a step, so it reads every object through C-level getters.
    """

    def __init__(self, predictor: TDPredictor, library: ctypes.CDLL) -> None:
        self.predictor = predictor
        self._library = library
        self._dtype_name = "float32" if predictor.learner.dtype == torch.float32 else "float64"
        self._td = TDArgs()
        self._learner_args: ctypes.Structure = ColumnArgs()
        self._entry: Any = None
        self._bound: tuple[Any, ...] = ()
        self._stage_arrays: list[Any] = []  # pointer arrays the kernel reads (keep alive)
        self._arguments: tuple[Any, ...] = ()  # (byref(td), byref(learner args))

    def step(
        self,
        layout: Layout,
        observation: Tensor,
        cumulant: Tensor,
        gamma: Tensor | float,
    ) -> Tensor | None:
        """One TD step of every stream.

        Args:
            layout: the learner's ``fused_layout()`` for this step, with the predictor's
                optimiser already bound to the parameters it names.
            observation: ``[B, d]`` CPU tensor, checked for shape and dtype by the caller.
            cumulant: ``[B, K]``, likewise.
            gamma: a float or a ``[B]`` tensor.

        Returns:
            The predictions ``[B, K]`` (a new tensor), or None if an input is not finite, in
            which case nothing changed.
        """
        predictor = self.predictor
        tensors = self._tensors(layout)
        if len(tensors) != len(self._bound) or not all(map(operator.is_, tensors, self._bound)):
            predictor.follow_learner_parameters()  # a new stage's parameters: new optimiser
            self._bind(layout)
            self._bound = self._tensors(layout)  # binding may have created optimiser state
        td = self._td
        groups = predictor.optimizer.param_groups
        td.head_lr = groups[0]["lr"]
        td.learner_lr = groups[-1]["lr"]
        td.threads = torch.get_num_threads()
        td.parallel_grain = PARALLEL_GRAIN
        observation, cumulant = observation.contiguous(), cumulant.contiguous()
        td.x = observation.data_ptr()
        td.cumulant = cumulant.data_ptr()
        if isinstance(gamma, Tensor):
            gamma = gamma.contiguous()
            td.discount = gamma.data_ptr()
        else:
            td.discount = None
            td.gamma = gamma
        prediction = torch.empty_like(predictor.previous_prediction)  # [B, K], contiguous
        td.prediction = prediction.data_ptr()
        if isinstance(layout, DenseTangent) and layout.draw_signs is not None:
            layout.draw_signs()
        if self._entry(*self._arguments) != 0:
            if isinstance(layout, DenseTangent) and layout.step_refused is not None:
                layout.step_refused()
            return None
        if layout.step_taken is not None:
            layout.step_taken()
        return prediction

    # ------------------------------------------------------------------ binding
    def _optimizer_states(self) -> list[tuple[Tensor | None, Tensor | None, Tensor | None]]:
        """``(state_a, state_b, step)`` of the heads and, if it trains, each learner parameter."""
        predictor = self.predictor
        params = [predictor.head_weight]
        if self._trains_learner():
            params += list(predictor.learner.params.values())
        return [optimizer_state(predictor.optimizer, param) for param in params]

    def _trains_learner(self) -> bool:
        return self.predictor.config.train_learner and bool(self.predictor.learner.params)

    def _tensors(self, layout: Layout) -> tuple[Any, ...]:
        """Every object whose replacement calls for a new binding."""
        predictor = self.predictor
        # The optimiser's state: each parameter's state dict and the tensors in it (read
        # through the mapping's values: hashing a tensor key costs a Python call).
        states = predictor.optimizer.state.values()
        return (
            *_PREDICTOR_TENSORS(predictor),
            *predictor.learner_traces.values(),
            *states,
            *itertools.chain.from_iterable(map(dict.values, states)),
            *layout.tensors(),
        )

    def _bind(self, layout: Layout) -> None:
        predictor, learner, config = self.predictor, self.predictor.learner, self.predictor.config
        td = self._td
        td.streams = learner.streams
        td.param_streams = learner.param_streams
        td.input_size = learner.input_size
        td.n_features = learner.n_features
        td.n_cumulants = predictor.n_cumulants
        td.n_head_features = predictor.n_head_features
        td.include_observation = config.include_observation
        td.include_bias = config.include_bias
        td.train_learner = self._trains_learner()
        td.lambda_ = config.lambda_
        td.input_decay = predictor.input_normalizer.decay
        td.input_floor = predictor.input_normalizer.variance_floor
        td.input_mean = _pointer(predictor.input_normalizer.mean)
        td.input_variance = _pointer(predictor.input_normalizer.variance)
        td.feature_decay = predictor.feature_normalizer.decay
        td.feature_floor = predictor.feature_normalizer.variance_floor
        td.feature_mean = _pointer(predictor.feature_normalizer.mean)
        td.feature_variance = _pointer(predictor.feature_normalizer.variance)
        td.previous_prediction = _pointer(predictor.previous_prediction)
        td.has_previous = _pointer(predictor.has_previous)
        td.head_weight = _pointer(predictor.head_weight)
        td.head_trace = _pointer(predictor.head_trace)

        group = predictor.optimizer.param_groups[0]
        arguments = td.optimizer
        arguments.kind = OPTIMIZER_KINDS[config.optimizer]
        if config.optimizer == "rmsprop_td":
            arguments.beta, arguments.eps = group["beta"], group["eps"]
        elif config.optimizer == "adam":
            arguments.beta1, arguments.beta2 = (float(beta) for beta in group["betas"])
            arguments.eps = group["eps"]
        states = self._optimizer_states()
        td.head_state_a, td.head_state_b, td.head_step = map(_pointer, states[0])
        if td.train_learner and len(predictor.learner_traces) == 1:
            (trace,) = predictor.learner_traces.values()
            td.learner_trace = _pointer(trace)
            td.learner_state_a, td.learner_state_b, td.learner_step = map(_pointer, states[1])
        arguments.step_is_double = any(
            step is not None and step.dtype == torch.float64 for _, _, step in states
        )

        if isinstance(layout, ColumnStages):
            self._learner_args, self._stage_arrays = _column_args(layout)
            name = "td_columns"
        elif isinstance(layout, ElementwiseCells):
            self._learner_args, self._stage_arrays = self._elementwise_args(layout)
            name = "td_elstm"
        else:
            args_type, name = {
                DenseWindow: (WindowArgs, "td_window"),
                DenseTangent: (TangentArgs, "td_uoro"),
                OwnUnitSensitivities: (SnapArgs, "td_snap1"),
            }[type(layout)]
            self._learner_args = _named_args(args_type, layout)
        # A fresh function object without ``argtypes`` (``load_library`` declares them on the
        # library's own): the arguments are the two structs bound here, passed by reference,
        # and ctypes' per-call conversion would cost ~0.4 µs a step.
        self._entry = self._library[f"{name}_{self._dtype_name}"]
        self._arguments = (ctypes.byref(td), ctypes.byref(self._learner_args))

    def _elementwise_args(self, layout: ElementwiseCells) -> tuple[ElementwiseArgs, list[Any]]:
        """``ElementwiseArgs`` for ``layout``: per parameter, its trace and optimiser state."""
        predictor = self.predictor
        args = ElementwiseArgs()
        (args.c,) = map(_pointer, layout.carry)
        args.sensitivity = _pointer(layout.sensitivity)
        args.output_gate = _pointer(layout.output_gate)
        args.last_input = _pointer(layout.last_input)
        key_of = {id(param): key for key, param in predictor.learner.params.items()}
        parameters = layout.parameters()
        traces = [predictor.learner_traces[key_of[id(param)]] for param in parameters]
        states = [
            optimizer_state(predictor.optimizer, param) if self._trains_learner() else (None,) * 3
            for param in parameters
        ]
        arrays = []
        for name, tensors in (
            ("parameters", parameters),
            ("parameter_traces", traces),
            ("parameter_states_a", [state[0] for state in states]),
            ("parameter_states_b", [state[1] for state in states]),
            ("parameter_steps", [state[2] for state in states]),
        ):
            array = (ctypes.c_void_p * len(tensors))(*map(_pointer, tensors))
            setattr(args, name, ctypes.cast(array, ctypes.c_void_p))
            arrays.append(array)
        return args, arrays


def _pointer(tensor: Tensor | None) -> int | None:
    """Address of a contiguous CPU tensor (None for None or an empty tensor)."""
    if tensor is None or tensor.numel() == 0:
        return None
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(
            f"fused TD step: a {tensor.device} tensor of shape {list(tensor.shape)} is not a "
            "contiguous CPU tensor"
        )
    return tensor.data_ptr()


def _column_args(layout: ColumnStages) -> tuple[ColumnArgs, list[Any]]:
    """``ColumnArgs`` for ``layout`` and the pointer arrays it refers to (keep them alive)."""
    args = ColumnArgs()
    args.columns_per_stage = layout.columns_per_stage
    args.active_stage = len(layout.weights) - 1
    args.normalize_inputs = bool(layout.input_mean)
    args.normalize_features = layout.normalize_features
    args.normalization_rate = layout.normalization_rate
    args.variance_floor = layout.variance_floor
    args.h, args.c = map(_pointer, layout.carry)
    args.sensitivity_h = _pointer(layout.sensitivity_h)
    args.sensitivity_c = _pointer(layout.sensitivity_c)
    arrays = []
    for name, tensors in (
        ("stage_weights", layout.weights),
        ("stage_input_means", layout.input_mean),
        ("stage_input_variances", layout.input_variance),
        ("stage_means", layout.feature_mean),
        ("stage_variances", layout.feature_variance),
    ):
        array = (ctypes.c_void_p * len(tensors))(*map(_pointer, tensors))
        setattr(args, name, ctypes.cast(array, ctypes.c_void_p))
        arrays.append(array)
    return args, arrays


def _named_args(
    args_type: type[ctypes.Structure], layout: DenseWindow | DenseTangent | OwnUnitSensitivities
) -> ctypes.Structure:
    """``args_type`` filled from the layout field of each name (``h, c`` from its carry).

    Pointer fields get the tensor's address, the others the value itself.
    """
    args = args_type()
    carry = dict(zip(("h", "c"), layout.carry, strict=True))
    for name, field_type, *_ in args_type._fields_:
        value = carry[name] if name in carry else getattr(layout, name)
        setattr(args, name, _pointer(value) if field_type is ctypes.c_void_p else value)
    return args
