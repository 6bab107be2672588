"""Flat float encodings of Gymnasium observations and actions, batched over streams.

A state learner takes a flat input vector. ``make_space_encoder`` turns a space into an
encoder that maps a *batch* of values (the leading axis is the stream, the way vector envs
batch them) to a float64 array ``[streams, size]``:

* ``Box``: flattened (row-major), bounds kept;
* ``Discrete``, ``MultiDiscrete``: one-hot per dimension, bounds [0, 1];
* ``MultiBinary``: flattened 0/1;
* ``Dict``, ``Tuple``: the parts concatenated in the space's order (as
  ``gymnasium.spaces.utils.flatten`` orders them).

Image-like boxes are refused: a flat online learner over raw pixels is slow and learns
poorly; pass an ``encoder`` callable instead (``CallableEncoder``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import iterate

Encoder = Callable[[Any], Any]
"""A user feature encoder: one observation -> 1-D array of floats."""


class SpaceEncoder:
    """Maps batched values of one space to flat float64 vectors.

    Attributes:
        size: length ``d`` of the encoding.
        low: ``[d]`` lower bound of every component (float64, may be -inf).
        high: ``[d]`` upper bound of every component (float64, may be inf).
        component_names: ``d`` names such as ``observation[2]`` or
            ``observation['cue']==1``, used in error messages.

    Example:
        >>> from gymnasium import spaces
        >>> encoder = make_space_encoder(spaces.Discrete(3), "action")
        >>> encoder.encode(np.array([2, 0]), streams=2).tolist()
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
        >>> encoder.component_names
        ['action==0', 'action==1', 'action==2']
    """

    def __init__(self, low: np.ndarray, high: np.ndarray, component_names: list[str]) -> None:
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        self.component_names = component_names
        self.size = len(component_names)

    def encode(self, batch: Any, streams: int) -> np.ndarray:
        """Encode a batch of values.

        Args:
            batch: values of the space stacked on a leading stream axis (a vector env's
                batch: an array ``[streams, ...]``, or a dict / tuple of such arrays).
            streams: number of values in the batch.

        Returns:
            ``[streams, size]`` float64.
        """
        raise NotImplementedError

    def encode_one(self, value: Any) -> np.ndarray:
        """Encode one unbatched value; returns ``[1, size]`` float64."""
        return self.encode(self.add_stream_axis(value), 1)

    def add_stream_axis(self, value: Any) -> Any:
        """The batch of one value: ``value`` with a leading axis of size 1."""
        return np.asarray(value)[None]


class BoxEncoder(SpaceEncoder):
    """A ``Box`` flattened row-major."""

    def __init__(self, space: spaces.Box, name: str) -> None:
        indices = np.ndindex(*space.shape) if space.shape else [()]
        names = [f"{name}[{', '.join(map(str, index))}]" for index in indices]
        super().__init__(space.low.ravel(), space.high.ravel(), names)

    def encode(self, batch: Any, streams: int) -> np.ndarray:
        """See ``SpaceEncoder.encode``."""
        return np.asarray(batch, dtype=np.float64).reshape(streams, self.size)


class OneHotEncoder(SpaceEncoder):
    """``Discrete`` and ``MultiDiscrete``: one one-hot block per dimension."""

    def __init__(self, space: spaces.Discrete | spaces.MultiDiscrete, name: str) -> None:
        if isinstance(space, spaces.Discrete):
            self.n_values = np.array([int(space.n)])
            self.start = np.array([int(space.start)])
            labels = [name]
        else:
            self.n_values = np.asarray(space.nvec, dtype=np.int64).ravel()
            self.start = np.asarray(space.start, dtype=np.int64).ravel()
            labels = [f"{name}[{i}]" for i in range(len(self.n_values))]
        self.offsets = np.concatenate([[0], np.cumsum(self.n_values)[:-1]])
        names = [
            f"{label}=={start + value}"
            for label, start, n in zip(labels, self.start, self.n_values, strict=True)
            for value in range(n)
        ]
        size = len(names)
        self._identity = np.eye(size)
        super().__init__(np.zeros(size), np.ones(size), names)

    def encode(self, batch: Any, streams: int) -> np.ndarray:
        """See ``SpaceEncoder.encode``; a value outside the space raises ``ValueError``."""
        values = np.asarray(batch, dtype=np.int64).reshape(streams, len(self.n_values))
        values = values - self.start
        if values.size and (values.min() < 0 or (values >= self.n_values).any()):
            raise ValueError(
                f"value {np.asarray(batch).tolist()} lies outside the space "
                f"(start {self.start.tolist()}, sizes {self.n_values.tolist()})"
            )
        return self._identity[values + self.offsets].sum(axis=1)


class CompositeEncoder(SpaceEncoder):
    """``Dict`` and ``Tuple``: the parts' encodings concatenated in the space's order."""

    def __init__(self, space: spaces.Dict | spaces.Tuple, name: str) -> None:
        self.is_dict = isinstance(space, spaces.Dict)
        if self.is_dict:
            self.keys: list[Any] = list(space.spaces)
            children = [make_space_encoder(space[k], f"{name}[{k!r}]") for k in self.keys]
        else:
            self.keys = list(range(len(space.spaces)))
            children = [make_space_encoder(space[k], f"{name}[{k}]") for k in self.keys]
        self.children = children
        super().__init__(
            np.concatenate([child.low for child in children]),
            np.concatenate([child.high for child in children]),
            [label for child in children for label in child.component_names],
        )

    def encode(self, batch: Any, streams: int) -> np.ndarray:
        """See ``SpaceEncoder.encode``."""
        return np.concatenate(
            [
                child.encode(batch[k], streams)
                for k, child in zip(self.keys, self.children, strict=True)
            ],
            axis=1,
        )

    def add_stream_axis(self, value: Any) -> Any:
        """See ``SpaceEncoder.add_stream_axis``."""
        parts = [
            child.add_stream_axis(value[k])
            for k, child in zip(self.keys, self.children, strict=True)
        ]
        return dict(zip(self.keys, parts, strict=True)) if self.is_dict else tuple(parts)


class CallableEncoder(SpaceEncoder):
    """A user's feature encoder applied to each stream's whole observation.

    The encoding's size is read from one call on a sample of the space (drawn from a copy,
    so the space's own random state is untouched). Bounds are unknown: (-inf, inf).

    Example:
        >>> from gymnasium import spaces
        >>> image = spaces.Box(0, 255, (8, 8, 3), np.uint8)
        >>> encoder = CallableEncoder(image, lambda frame: frame.mean(axis=(0, 1)) / 255)
        >>> encoder.encode(np.zeros((2, 8, 8, 3), np.uint8), streams=2).shape
        (2, 3)
    """

    def __init__(self, space: spaces.Space, encoder: Encoder, name: str = "encoded") -> None:
        self.space = space
        self.encoder = encoder
        size = self._features(copy.deepcopy(space).sample()).size
        if size == 0:
            raise ValueError("the encoder returned an empty array; it must return >= 1 feature")
        names = [f"{name}[{i}]" for i in range(size)]
        super().__init__(np.full(size, -np.inf), np.full(size, np.inf), names)

    def _features(self, observation: Any) -> np.ndarray:
        return np.asarray(self.encoder(observation), dtype=np.float64).ravel()

    def encode(self, batch: Any, streams: int) -> np.ndarray:
        """See ``SpaceEncoder.encode``; every call must return ``size`` features."""
        encoded = [self._features(value) for value in iterate(self.space, batch)]
        sizes = {features.size for features in encoded}
        if sizes != {self.size}:
            raise ValueError(
                f"the encoder returned {sorted(sizes)} features; it returned {self.size} on "
                "the first call and must keep that size"
            )
        return np.stack(encoded)

    def add_stream_axis(self, value: Any) -> Any:
        """See ``SpaceEncoder.add_stream_axis``."""
        return _batch_of_one(self.space, value)


def _batch_of_one(space: spaces.Space, value: Any) -> Any:
    if isinstance(space, spaces.Dict):
        return {key: _batch_of_one(space[key], value[key]) for key in space.spaces}
    if isinstance(space, spaces.Tuple):
        return tuple(
            _batch_of_one(part, item) for part, item in zip(space.spaces, value, strict=True)
        )
    return np.asarray(value)[None]


def is_image_space(space: spaces.Space) -> bool:
    """Whether ``space`` looks like pixels.

    A ``Box`` with two or more axes of dtype uint8 (SB3's image convention), or any ``Box``
    with three or more axes.
    """
    if not isinstance(space, spaces.Box):
        return False
    ndim = len(space.shape)
    return (ndim >= 2 and space.dtype == np.uint8) or ndim >= 3


def image_parts(space: spaces.Space, name: str = "observation") -> list[str]:
    """Names of the image-like parts of ``space`` (nested in ``Dict`` / ``Tuple``)."""
    if isinstance(space, spaces.Dict):
        return [p for key in space.spaces for p in image_parts(space[key], f"{name}[{key!r}]")]
    if isinstance(space, spaces.Tuple):
        return [p for i, part in enumerate(space.spaces) for p in image_parts(part, f"{name}[{i}]")]
    return [f"{name} {space}"] if is_image_space(space) else []


def make_space_encoder(space: spaces.Space, name: str) -> SpaceEncoder:
    """The flat encoder of ``space`` (see the module docstring).

    Args:
        space: a Box, Discrete, MultiDiscrete, MultiBinary, Dict or Tuple space.
        name: prefix of the component names (``observation``, ``previous action``).

    Returns:
        The encoder.

    Raises:
        TypeError: for any other space (Text, Graph, Sequence, ...).
    """
    if isinstance(space, spaces.MultiBinary):
        return BoxEncoder(spaces.Box(0, 1, space.shape, dtype=np.int8), name)
    if isinstance(space, spaces.Box):
        return BoxEncoder(space, name)
    if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete)):
        return OneHotEncoder(space, name)
    if isinstance(space, (spaces.Dict, spaces.Tuple)):
        return CompositeEncoder(space, name)
    raise TypeError(
        f"{name} space {space} is not supported: use Box, Discrete, MultiDiscrete, "
        "MultiBinary, Dict or Tuple, or pass an encoder callable that maps one observation "
        "to a 1-D float array"
    )


def make_observation_encoder(space: spaces.Space, encoder: Encoder | None) -> SpaceEncoder:
    """The encoder of an observation space: ``encoder`` if given, else the flat encoding.

    Raises:
        ValueError: ``space`` holds an image and no ``encoder`` is given.
    """
    if encoder is not None:
        return CallableEncoder(space, encoder)
    images = image_parts(space)
    if images:
        raise ValueError(
            f"image observations are not supported as raw input: {'; '.join(images)}. A flat "
            "online learner over raw pixels is slow and learns poorly. Pass "
            "encoder=callable (one observation -> 1-D float array, e.g. a frozen CNN or a "
            "small downsampled grayscale), or preprocess the env first (e.g. "
            "gymnasium.wrappers.GrayscaleObservation, ResizeObservation((16, 16)) and "
            "FlattenObservation)"
        )
    return make_space_encoder(space, "observation")
