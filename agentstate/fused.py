"""Compiled TD(lambda) steps: ``TDPredictor.step`` for every stream in one call.

The eager step (``agentstate.td``) is a few hundred small tensor ops; at the sizes this field
works at (a few columns, a dozen inputs, tens of streams) each op's fixed cost of a few µs is
the whole bill. A compiled step does the same work -- normalisation, the learner's forward
and credit assignment, heads, TD error, optimiser steps, traces -- as plain loops over
streams, reading and writing every large array once.

Speed is a learner's capability, and every learner, built-in or third-party, gets it the same
way: its class has a ``fused_layout()`` method returning a :class:`FusedLayout`, which names
the learner's tensors the kernel advances in place and the :class:`Kernel` to run: one C++
file that includes ``agentstate/engine.h`` (the shared engine: normalisation, heads, TD
error, optimisers, traces; see ``kernels/engine.h``) and defines the entry points. A kernel
is compiled at first use with the system C++ compiler into a user cache directory (one build
per source, compiler, flags and machine kind; concurrent processes wait on a file lock
instead of all compiling) and called through ``ctypes``; it has no dependency on torch's
headers. Without a compiler, or if the build fails, one warning is issued and the eager path
runs.

``TDPredictor`` hands the kernel one explicit :class:`EngineState` (its tensors and
hyper-parameters); the kernel reads nothing else of the predictor and calls nothing back.
The step works in place on the very tensors the eager path uses, so ``state_dict``,
``reset_streams`` and a later eager step see exactly what the kernel did.

Threads: a step uses up to ``torch.get_num_threads()`` threads, the knob torch users already
set, and only once it is large enough to pay for them (``PARALLEL_GRAIN``); every thread count
gives bitwise the same result.

Numerics follow the eager op order element by element (kernels are compiled without
contracting multiply-adds); sums over inputs, streams and gates may round differently in the
last bit, so float32 results agree to ~1e-6 relative, float64 results to ~1e-12.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

try:  # POSIX: builders of the same kernel take turns
    import fcntl
except ImportError:  # pragma: no cover - Windows: concurrent builds, each replacing atomically
    fcntl = None  # type: ignore[assignment]

ENGINE_HEADER = Path(__file__).parent / "kernels" / "engine.h"
ACTOR_CRITIC_HEADER = Path(__file__).parent / "kernels" / "actor_critic.h"
"""The shared engine every kernel includes as ``<agentstate/engine.h>``."""

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
"""Least work (parameter-stream entries of the sweep) that earns a step another thread:
starting and joining a thread costs tens of µs, several times per step (``benchmarks/``
has the measurements). The split never changes the numbers, only the time."""

X86_FLAGS = ("-mprefer-vector-width=256",)
"""x86-64 only: rows of 12-20 entries (the small networks this field runs) fill 256-bit
vectors better than 512-bit ones."""

VECTOR_MATH = ("-DAGENTSTATE_LIBMVEC",)
VECTOR_MATH_LIBRARIES = ("-lmvec",)
"""glibc's vector math library: ``exp`` and ``tanh`` of the gates vectorise across streams
or units. Tried first on x86-64 Linux; a toolchain without it builds the kernel with scalar
libm calls instead."""

OPTIMIZER_KINDS = {"sgd": 0, "rmsprop_td": 1, "adam": 2}


class FusedKernelWarning(UserWarning):
    """A fused kernel could not be built or loaded; the eager path runs instead."""


# ---------------------------------------------------------------------- the learner's side
@dataclass(frozen=True)
class Kernel:
    """A learner's compiled TD step.

    ``sources`` are compiled as one translation unit (usually one ``.cpp`` file) that
    includes ``<agentstate/engine.h>`` and defines ``int <entry>_float32(const TDArgs*, const
    <args_type>*)`` and ``_float64``, returning 0. ``headers`` are the learner's own headers
    the sources include by name. The C declaration of ``args_type`` (a ``ctypes.Structure``
    of ``c_int64``, ``c_double`` and ``c_void_p`` fields) is generated into ``kernel_args.h``
    beside ``TDArgs``, so Python and C++ cannot disagree.

    A kernel whose step body is written against the engine's interface (a function template
    over the engine type) can also run the streaming actor-critic: including
    ``<agentstate/actor_critic.h>`` and writing ``AGENTSTATE_ACTOR_CRITIC_ENTRIES(<entry>,
    <body>, <args_type>)`` defines ``<entry>_actor_critic_float32/64``, which
    ``agentstate.rl.RTRLActorCritic`` then uses (:func:`has_actor_critic`).
    """

    entry: str
    sources: tuple[Path, ...]
    args_type: type[ctypes.Structure]
    headers: tuple[Path, ...] = ()


class FusedLayout(Protocol):
    """What a learner's ``fused_layout()`` returns: the kernel and the tensors it advances.

    Reading a layout has no side effects. Before each compiled step the TD engine calls the
    learner's ``begin_step()`` (as ``StateLearner.step`` does), then ``fused_layout()``.
    """

    kernel: Kernel

    def parameters(self) -> Sequence[Tensor]:
        """The learner's parameters in the kernel's order.

        The engine passes each one's traces and optimiser state in the same order
        (``Engine::learner_trace(i)``).
        """
        ...

    def tensors(self) -> tuple[Tensor, ...]:
        """Every learner tensor the kernel reads or writes (replacing one: a new binding)."""
        ...

    def arguments(self, dtype: torch.dtype) -> tuple[ctypes.Structure, list[Any]]:
        """The kernel's ``args_type`` filled for these tensors, and what must stay alive.

        See :func:`struct_arguments`.
        """
        ...

    def agent_state(self) -> Tensor:
        """``h_t: [B, n_features]`` after the latest compiled step."""
        ...


def pointer(tensor: Tensor | None, dtype: torch.dtype | None = None) -> int | None:
    """Address of a contiguous CPU tensor of ``dtype`` (None for None or an empty tensor)."""
    if tensor is None or tensor.numel() == 0:
        return None
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(
            f"fused TD step: a {tensor.device} tensor of shape {list(tensor.shape)} is not a "
            "contiguous CPU tensor"
        )
    if dtype is not None and tensor.dtype != dtype:
        raise ValueError(
            f"fused TD step: a tensor of shape {list(tensor.shape)} is {tensor.dtype}, the "
            f"kernel expects {dtype}"
        )
    return tensor.data_ptr()


def struct_arguments(
    args_type: type[ctypes.Structure], dtype: torch.dtype, values: Mapping[str, Any]
) -> tuple[ctypes.Structure, list[Any]]:
    """``args_type`` with each field set from ``values[field name]``.

    A pointer field takes a tensor (its address; floating tensors must be ``dtype``, others
    any integer or bool type) or a sequence of tensors (the address of an array of their
    addresses); other fields take the value itself.

    Returns:
        The struct, and the pointer arrays it refers to (keep them alive with it).
    """
    args = args_type()
    arrays: list[Any] = []
    for name, field_type, *_ in args_type._fields_:
        value = values[name]
        if field_type is not ctypes.c_void_p:
            setattr(args, name, value)
        elif isinstance(value, Tensor) or value is None:
            setattr(args, name, _typed_pointer(value, dtype))
        else:
            array = (ctypes.c_void_p * len(value))(*(_typed_pointer(t, dtype) for t in value))
            setattr(args, name, ctypes.cast(array, ctypes.c_void_p))
            arrays.append(array)
    return args, arrays


def _typed_pointer(tensor: Tensor | None, dtype: torch.dtype) -> int | None:
    if tensor is not None and tensor.dtype.is_floating_point:
        return pointer(tensor, dtype)
    return pointer(tensor)


# ---------------------------------------------------------------------- the engine's side
@dataclass(frozen=True, eq=False)
class EngineState:
    """Everything of a TD engine a compiled step reads or writes, handed over explicitly.

    ``TDPredictor`` builds it (``agentstate.td``); the kernel sees these tensors and settings
    and nothing else. Shapes as in ``TDPredictor``: ``P`` parameter streams, ``K``
    cumulants, ``F`` head features.
    """

    streams: int
    param_streams: int
    input_size: int
    n_features: int
    n_cumulants: int
    n_head_features: int
    include_observation: bool
    include_bias: bool
    train_learner: bool
    lambda_: float
    input_decay: float
    input_floor: float
    feature_decay: float
    feature_floor: float
    optimizer: str
    """``sgd``, ``rmsprop_td`` or ``adam``."""
    param_groups: Sequence[Mapping[str, Any]]
    """The optimiser's groups (heads first, then the learner's): step sizes and settings,
    read at every step."""
    input_mean: Tensor
    """``[P, d]``, with ``input_variance``: the observation's running statistics."""
    input_variance: Tensor
    feature_mean: Tensor
    """``[P, n]``, with ``feature_variance``: the agent state's running statistics."""
    feature_variance: Tensor
    previous_prediction: Tensor
    """``[B, K]``."""
    has_previous: Tensor
    """``[B]`` bool."""
    head_weight: Tensor
    """``[P, K, F]``."""
    head_trace: Tensor
    """``[B, K, F]``."""
    head_optimizer_state: tuple[Tensor | None, Tensor | None, Tensor | None]
    """``(state_a, state_b, step)`` (``agentstate.optim.optimizer_state``)."""
    learner_parameters: Mapping[str, Tensor]
    learner_traces: Mapping[str, Tensor]
    """``[K, B, ...]`` per parameter."""
    learner_optimizer_states: Mapping[str, tuple[Tensor | None, Tensor | None, Tensor | None]]


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


_ENGINE_SIZES = (
    "streams",
    "param_streams",
    "input_size",
    "n_features",
    "n_cumulants",
    "n_head_features",
    "include_observation",
    "include_bias",
    "train_learner",
)
"""``EngineState`` fields the kernel takes as integers (``TDArgs``)."""
_ENGINE_RATES = ("lambda_", "input_decay", "input_floor", "feature_decay", "feature_floor")
"""``EngineState`` fields the kernel takes as doubles."""


class TDArgs(ctypes.Structure):
    """Sizes, settings and tensors of the engine; pointers address contiguous tensors.

    ``learner_traces``, ``learner_states_a``, ``learner_states_b`` and ``learner_steps``
    point at arrays with one entry per learner parameter, in the layout's order.
    """

    _fields_ = [
        *(
            (name, ctypes.c_int64)
            for name in (*_ENGINE_SIZES, "threads", "parallel_grain", "discount_per_cumulant")
        ),
        *((name, ctypes.c_double) for name in ("gamma", "learner_step_size", "head_step_size")),
        *((name, ctypes.c_double) for name in _ENGINE_RATES),
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
                "learner_traces",
                "learner_states_a",
                "learner_states_b",
                "learner_steps",
            )
        ),
    ]


class ACArgs(ctypes.Structure):
    """Sizes, settings and tensors of one streaming actor-critic step.

    The struct of ``kernels/actor_critic.h``, bound by ``agentstate.rl.fused_step``.

    Observations, rewards and the running statistics are float64; everything else is the
    kernel's dtype. ``core_traces`` points at an array with one trace per learner parameter,
    in the layout's order, and ``core_trace_sizes`` at their sizes per stream (int64).
    """

    _fields_ = [
        *(
            (name, ctypes.c_int64)
            for name in (
                "streams",
                "param_streams",
                "observation_size",
                "n_actions",
                "discrete",
                "n_features",
                "n_head_features",
                "include_observation",
                "include_prev_action",
                "normalize_observations",
                "scale_rewards",
                "train_learner",
                "n_core_parameters",
                "threads",
                "parallel_grain",
            )
        ),
        *(
            (name, ctypes.c_double)
            for name in (
                "gamma",
                "lambda_",
                "critic_step_size",
                "actor_step_size",
                "learner_step_size",
                "critic_kappa",
                "actor_kappa",
                "learner_kappa",
                "entropy_coefficient",
                "observation_eps",
                "reward_eps",
            )
        ),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "observation",
                "reward",
                "done",
                "bootstrap",
                "noise",
                "action",
                "action_input",
                "action_low",
                "action_high",
                "action_scale",
                "action_offset",
                "log_std_low",
                "log_std_high",
                "started",
                "previous_value",
                "previous_features",
                "previous_entropy_score",
                "observation_count",
                "observation_mean",
                "observation_m2",
                "reward_sum",
                "reward_count",
                "reward_mean",
                "reward_m2",
                "critic_weight",
                "critic_trace",
                "actor_weight",
                "actor_trace",
                "log_std",
                "log_std_trace",
                "core_traces",
                "core_trace_sizes",
                "statistics",
            )
        ),
    ]


_C_TYPES = {ctypes.c_int64: "int64_t", ctypes.c_double: "double", ctypes.c_void_p: "void*"}


def c_declarations(*structs: type[ctypes.Structure]) -> str:
    """C++ declarations of the engine's structs and ``structs`` (the ``kernel_args.h``)."""
    lines = ["#pragma once", "#include <cstdint>"]
    declared: tuple[type[ctypes.Structure], ...] = (OptimizerArgs, TDArgs, ACArgs, *structs)
    for struct in declared:
        lines.append(f"struct {struct.__name__} {{")
        for name, field_type, *_ in struct._fields_:
            c_type = _C_TYPES.get(field_type, field_type.__name__)
            lines.append(f"  {c_type} {name};")
        lines.append("};")
    return "\n".join(lines) + "\n"


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


def _is_x86_64() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def _vector_math_possible() -> bool:
    """Whether to try glibc's libmvec: x86-64 Linux only (its ABI names are per ISA)."""
    return platform.system() == "Linux" and _is_x86_64()


class BuildError(RuntimeError):
    """The compiler refused a kernel; ``library`` is where it would have gone."""

    def __init__(self, message: str, library: Path) -> None:
        super().__init__(message)
        self.library = library


def _kernel_files(kernel: Kernel) -> dict[str, str]:
    """Relative path -> text of every file of ``kernel``'s build."""
    files = {
        "kernel_args.h": c_declarations(kernel.args_type),
        "agentstate/engine.h": ENGINE_HEADER.read_text(),
        "agentstate/actor_critic.h": ACTOR_CRITIC_HEADER.read_text(),
    }
    for path in (*kernel.headers, *kernel.sources):
        files[path.name] = Path(path).read_text()
    return files


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (other processes building the same kernel wait)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(kernel: Kernel, compiler: str, vector_math: bool = False) -> Path:
    """Compile ``kernel`` into the cache, once per source, compiler, flags and machine kind."""
    files = _kernel_files(kernel)
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    flags = (*COMPILER_FLAGS, *(X86_FLAGS if _is_x86_64() else ()))
    if vector_math:
        flags += VECTOR_MATH
    libraries = VECTOR_MATH_LIBRARIES if vector_math else ()
    content = [f"{name}\0{text}" for name, text in sorted(files.items())]
    key = hashlib.sha256(
        "\0".join([*content, version, *flags, *libraries, _machine_signature()]).encode()
    ).hexdigest()[:16]
    directory = cache_directory() / "kernels"
    library = directory / f"{kernel.entry}-{key}.so"
    failed = library.with_suffix(".failed")  # see _build_best
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(library.with_suffix(".lock")):
        if library.exists():  # built while this process waited
            return library
        if failed.exists():
            raise BuildError(failed.read_text(), library)
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            for name, text in files.items():
                path = Path(scratch) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            sources = [str(Path(scratch) / Path(source).name) for source in kernel.sources]
            built = Path(scratch) / library.name
            result = subprocess.run(
                [compiler, *flags, f"-I{scratch}", *sources, "-o", str(built), *libraries],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise BuildError(f"{compiler} failed: {result.stderr.strip()[-2000:]}", library)
            os.replace(built, library)  # atomic: no process ever sees half a file
    return library


def _build_best(kernel: Kernel, compiler: str) -> Path:
    """The kernel with vector math where the toolchain has it, else without.

    When the vector-math build fails but the plain one succeeds, the toolchain lacks the
    vector library: a ``.failed`` note beside the would-be library sends later processes
    straight to the plain build (a source error fails both and is not remembered).
    """
    if not _vector_math_possible():
        return _build(kernel, compiler)
    try:
        return _build(kernel, compiler, vector_math=True)
    except BuildError as vector_failure:
        library = _build(kernel, compiler)
        vector_failure.library.with_suffix(".failed").write_text(str(vector_failure))
        return library


@functools.cache
def load_kernel(kernel: Kernel) -> ctypes.CDLL | None:
    """``kernel`` compiled and loaded (built on first use); None, with one warning, if not."""
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
        library = ctypes.CDLL(str(_build_best(kernel, compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        warnings.warn(
            f"agentstate: fused TD kernel {kernel.entry} unavailable ({reason}); using the "
            "eager path",
            FusedKernelWarning,
            stacklevel=3,
        )
        return None
    for dtype in ("float32", "float64"):
        entry = library[f"{kernel.entry}_{dtype}"]
        entry.argtypes = [ctypes.POINTER(TDArgs), ctypes.POINTER(kernel.args_type)]
        entry.restype = ctypes.c_int
        finite = library[f"agentstate_inputs_finite_{dtype}"]
        finite.argtypes = [ctypes.POINTER(TDArgs)]
        finite.restype = ctypes.c_int
    return library


# ---------------------------------------------------------------------- applicability
def has_actor_critic(library: ctypes.CDLL, kernel: Kernel) -> bool:
    """Whether ``library`` (``kernel``'s build) defines the actor-critic entry points."""
    try:
        library[f"{kernel.entry}_actor_critic_float64"]
        library[f"{kernel.entry}_actor_critic_float32"]
    except AttributeError:
        return False
    return True


def learner_unsupported_reason(learner: Any) -> str | None:
    """Why no compiled step (TD or actor-critic) can run ``learner`` (None: one can)."""
    if learner.device.type != "cpu":
        return f"device {learner.device} (the fused kernel is CPU-only)"
    if learner.dtype not in (torch.float32, torch.float64):
        return f"dtype {learner.dtype}"
    # Asked of the class: a proxy that forwards attributes but intercepts ``step`` (to record
    # the state, say) must not be bypassed by a kernel it never sees.
    if not callable(getattr(type(learner), "fused_layout", None)):
        return f"{type(learner).__name__} has no fused kernel (no fused_layout method)"
    return None


def unsupported_reason(
    learner: Any, optimizer: str, param_groups: Sequence[Mapping[str, Any]]
) -> str | None:
    """Why a compiled step cannot run ``learner`` with this optimiser (None: it can)."""
    reason = learner_unsupported_reason(learner)
    if reason is not None:
        return reason
    settings = [_optimizer_settings(optimizer, group) for group in param_groups]
    if any(setting is None for setting in settings):
        return f"optimizer {optimizer!r} with non-default settings"
    if len(set(settings)) != 1:
        return "parameter groups with different optimizer settings"
    return None


def _optimizer_settings(name: str, group: Mapping[str, Any]) -> tuple[float, ...] | None:
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


# ---------------------------------------------------------------------- the compiled step
class FusedTDStep:
    """Runs TD steps of one engine through a learner's compiled kernel.

    Two calls per step, made by the engine: :meth:`load_inputs` (the step's observation,
    cumulant and discount, checked for finiteness before anything moves), then :meth:`run`
    with the engine's state and the learner's layout. The kernel's view of the tensors (their
    addresses) is rebuilt whenever the engine state object or any layout tensor is replaced.
    """

    def __init__(
        self,
        kernel: Kernel,
        library: ctypes.CDLL,
        dtype: torch.dtype,
        *,
        streams: int,
        input_size: int,
        n_cumulants: int,
    ) -> None:
        self.kernel = kernel
        self.dtype = dtype
        name = "float32" if dtype == torch.float32 else "float64"
        # Fresh function objects without ``argtypes``: the arguments are the structs bound
        # here, passed by reference, and ctypes' per-call conversion would only cost.
        self._entry = library[f"{kernel.entry}_{name}"]
        self._finite = library[f"agentstate_inputs_finite_{name}"]
        self._td = TDArgs(streams=streams, input_size=input_size, n_cumulants=n_cumulants)
        self._td_reference = ctypes.byref(self._td)
        self._engine: EngineState | None = None
        self._layout_tensors: tuple[Tensor, ...] = ()
        self._keep_alive: list[Any] = []
        self._arguments: tuple[Any, ...] = ()
        self._inputs: tuple[Tensor, ...] = ()

    def load_inputs(self, observation: Tensor, cumulant: Tensor, gamma: Tensor | float) -> bool:
        """Take this step's inputs; False (and nothing changed) if one is not finite.

        Args:
            observation: ``[B, d]`` CPU tensor, checked for shape and dtype by the caller.
            cumulant: ``[B, K]``, likewise.
            gamma: a float, a ``[B]`` tensor (one per stream) or a ``[B, K]`` one (per stream
                and cumulant).
        """
        td = self._td
        observation, cumulant = observation.contiguous(), cumulant.contiguous()
        td.x = observation.data_ptr()
        td.cumulant = cumulant.data_ptr()
        if isinstance(gamma, Tensor):
            gamma = gamma.contiguous()
            td.discount = gamma.data_ptr()
            td.discount_per_cumulant = int(gamma.dim() == 2)
            self._inputs = (observation, cumulant, gamma)
        else:
            td.discount = None
            td.gamma = gamma
            self._inputs = (observation, cumulant)
        return bool(self._finite(self._td_reference))

    def run(self, engine: EngineState, layout: FusedLayout) -> Tensor:
        """One TD step of every stream with the inputs of :meth:`load_inputs`.

        Returns:
            The predictions ``[B, K]`` (a new tensor).
        """
        tensors = layout.tensors()
        if (
            engine is not self._engine
            or len(tensors) != len(self._layout_tensors)
            or not all(map(operator.is_, tensors, self._layout_tensors))
        ):
            self._bind(engine, layout)
            self._layout_tensors = tensors
        td = self._td
        groups = engine.param_groups
        td.head_step_size = groups[0]["lr"]
        td.learner_step_size = groups[-1]["lr"]
        td.threads = torch.get_num_threads()
        td.parallel_grain = PARALLEL_GRAIN
        prediction = torch.empty_like(engine.previous_prediction)  # [B, K], contiguous
        td.prediction = prediction.data_ptr()
        if self._entry(*self._arguments) != 0:
            raise RuntimeError(f"fused kernel {self.kernel.entry} failed")
        self._inputs = ()
        return prediction

    def _bind(self, engine: EngineState, layout: FusedLayout) -> None:
        dtype = self.dtype
        td = self._td
        for name in (*_ENGINE_SIZES, *_ENGINE_RATES):
            setattr(td, name, getattr(engine, name))
        for name in (
            "input_mean",
            "input_variance",
            "feature_mean",
            "feature_variance",
            "previous_prediction",
            "head_weight",
            "head_trace",
        ):
            setattr(td, name, pointer(getattr(engine, name), dtype))
        td.has_previous = pointer(engine.has_previous, torch.bool)

        group = engine.param_groups[0]
        arguments = td.optimizer
        arguments.kind = OPTIMIZER_KINDS[engine.optimizer]
        if engine.optimizer == "rmsprop_td":
            arguments.beta, arguments.eps = group["beta"], group["eps"]
        elif engine.optimizer == "adam":
            arguments.beta1, arguments.beta2 = (float(beta) for beta in group["betas"])
            arguments.eps = group["eps"]
        td.head_state_a, td.head_state_b, td.head_step = (
            _state_pointer(state, dtype) for state in engine.head_optimizer_state
        )
        steps = [engine.head_optimizer_state[2]]

        key_of = {id(param): key for key, param in engine.learner_parameters.items()}
        keys = [key_of[id(param)] for param in layout.parameters()]
        keep_alive: list[Any] = []
        for name in ("learner_traces", "learner_states_a", "learner_states_b", "learner_steps"):
            setattr(td, name, None)
        if engine.train_learner:
            states = [engine.learner_optimizer_states[key] for key in keys]
            steps += [state[2] for state in states]
            columns: dict[str, list[Tensor | None]] = {
                "learner_traces": [engine.learner_traces[key] for key in keys],
                "learner_states_a": [state[0] for state in states],
                "learner_states_b": [state[1] for state in states],
                "learner_steps": [state[2] for state in states],
            }
            for name, column in columns.items():
                array = (ctypes.c_void_p * len(column))(
                    *(_state_pointer(tensor, dtype) for tensor in column)
                )
                setattr(td, name, ctypes.cast(array, ctypes.c_void_p))
                keep_alive.append(array)
        arguments.step_is_double = any(
            step is not None and step.dtype == torch.float64 for step in steps
        )
        learner_arguments, arrays = layout.arguments(dtype)
        self._keep_alive = [*keep_alive, *arrays, learner_arguments]
        self._arguments = (self._td_reference, ctypes.byref(learner_arguments))
        self._engine = engine


def _state_pointer(tensor: Tensor | None, dtype: torch.dtype) -> int | None:
    """An optimiser state tensor's address (Adam's step count may be float32 or float64)."""
    if tensor is None:
        return None
    return pointer(tensor, tensor.dtype if tensor.dim() == 0 else dtype)
