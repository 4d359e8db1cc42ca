"""Map a torch module to and from the flat float32 vector of a :class:`ModelSpec`.

The vector is the model (ARCHITECTURE: "Model representation"). :func:`bind` makes every
parameter and floating buffer of a module a zero-copy ``torch.from_numpy`` view into one
vector, so an optimizer step writes straight into the vector that is then pushed, and
aggregation never has to walk a ``state_dict``.

Only the CPU shares memory with numpy: to train on CUDA/MPS, bind, move the module, and
read the result back with :func:`module_to_vector` (the trainer does exactly that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk._extras import missing

try:
    import torch
    from torch import nn
except ImportError as exc:
    raise missing("torch", "train", purpose="the torch bridge", cause=exc) from exc

from edge_sdk.errors import ConfigError, LocalProtocolError
from edge_sdk.spec import ModelSpec, Vector

__all__ = ["bind", "module_to_vector", "named_tensors", "spec_from_module", "top_level_group"]


def top_level_group(name: str) -> str:
    """``group_of`` that names a parameter's group after its top-level submodule
    (``"extractor.0.weight"`` → ``"extractor"``)."""
    return name.split(".", 1)[0]


def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters, then floating buffers, in registration order; integer buffers (such as
    BatchNorm's ``num_batches_tracked``) are not part of the vector."""
    yield from module.named_parameters()
    for name, buf in module.named_buffers():
        if buf.is_floating_point():
            yield name, buf


def spec_from_module(module: nn.Module, model_id: str, group_of: Callable[[str], str]) -> ModelSpec:
    """The spec of ``module``: every parameter and floating buffer, grouped by
    ``group_of(name)``. Groups keep the order of their first tensor and tensors keep module
    order inside a group, so each group is one contiguous slice of the vector."""
    by_group: dict[str, list[tuple[str, tuple[int, ...], str]]] = {}
    for name, tensor in named_tensors(module):
        if tensor.dtype != torch.float32:
            raise ConfigError(f"{model_id}: {name} is {tensor.dtype}; the vector is float32 only")
        group = group_of(name)
        by_group.setdefault(group, []).append((name, tuple(tensor.shape), group))
    if not by_group:
        raise ConfigError(f"{model_id}: module has no parameters")
    return ModelSpec.build(model_id, [entry for entries in by_group.values() for entry in entries])


def _lookup(module: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    tensor: torch.Tensor | None = owner._parameters.get(leaf)
    if tensor is None:
        tensor = owner._buffers.get(leaf)
    if tensor is None:
        raise ConfigError(f"module has no parameter or buffer {name!r}")
    return tensor


def _check_vector(spec: ModelSpec, vector: npt.NDArray[Any]) -> Vector:
    if not isinstance(vector, np.ndarray) or vector.dtype != np.float32 or vector.ndim != 1:
        raise LocalProtocolError("bind needs a 1-D float32 numpy vector")
    if vector.shape[0] != spec.size:
        raise LocalProtocolError(
            f"{spec.model_id}: vector has {vector.shape[0]} values, spec needs {spec.size}"
        )
    if not vector.flags.c_contiguous:
        raise LocalProtocolError("bind needs a contiguous vector (views must alias it)")
    if not vector.flags.writeable:
        # torch.from_numpy would warn and later writes would be undefined behaviour.
        raise LocalProtocolError(
            "bind needs a writable vector; copy a read-only (decoded) one first"
        )
    return vector


def bind(module: nn.Module, spec: ModelSpec, vector: Vector) -> None:
    """Make every tensor of ``spec`` inside ``module`` a zero-copy view into ``vector``.

    The tensor objects stay the same (``.data`` is swapped), so optimizers and hooks that
    hold them keep working; writes through the module land in ``vector`` and vice versa.
    """
    _check_vector(spec, vector)
    with torch.no_grad():
        for p in spec.params:
            tensor = _lookup(module, p.name)
            if tuple(tensor.shape) != p.shape:
                raise ConfigError(
                    f"{spec.model_id}: {p.name} has shape {tuple(tensor.shape)}, spec says {p.shape}"
                )
            view = vector[p.offset : p.offset + p.size].reshape(p.shape)
            tensor.data = torch.from_numpy(view)


def module_to_vector(module: nn.Module, spec: ModelSpec, out: Vector | None = None) -> Vector:
    """A copy of the module's tensors laid out by ``spec``, written into ``out`` when given
    (how the trainer reads weights back from a CUDA/MPS module)."""
    if out is None:
        out = spec.zeros()
    elif out.dtype != np.float32 or out.shape != (spec.size,):
        raise LocalProtocolError(f"out must be float32[{spec.size}]")
    with torch.no_grad():
        for p in spec.params:
            tensor = _lookup(module, p.name)
            if tuple(tensor.shape) != p.shape:
                raise ConfigError(
                    f"{spec.model_id}: {p.name} has shape {tuple(tensor.shape)}, spec says {p.shape}"
                )
            out[p.offset : p.offset + p.size] = (
                tensor.detach().to("cpu", torch.float32).reshape(-1).numpy()
            )
    return out
