"""Input checks shared by the public functions. Each error names the offending argument and runs
before any kernel does."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def float_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    return x


def logits(name: str, x: object) -> torch.Tensor:
    float_tensor(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary axis (shape (..., V)), got a 0-d tensor")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} has an empty vocabulary axis (V = 0)")
    return x


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def leading_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape[:-1] != ref.shape[:-1]:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, whose leading (token) dims differ from "
            f"{ref_name}'s {tuple(ref.shape)}"
        )


def positive(name: str, value: object) -> float:
    v = finite(name, value)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return v


# The kernels take 1/temperature and temperature**2 as float32: beyond these bounds one of them
# would be 0 or inf (and the loss NaN).
TEMPERATURE_RANGE = (1e-18, 1e18)


def temperature(name: str, value: object) -> float:
    v = positive(name, value)
    low, high = TEMPERATURE_RANGE
    if not low <= v <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}] (the kernels take 1/{name} and "
                         f"{name}**2 in float32), got {value}")
    return v


def finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    # v - v is 0 exactly when v is finite (inf - inf and NaN are NaN). Unlike math.isfinite,
    # dynamo traces it when the value became symbolic (torch.compile makes a float argument that
    # changes between calls, a temperature schedule, a symbol): it guards on the comparison.
    if not v - v == 0:
        raise ValueError(f"{name} must be finite, got {value}")
    return v


def integer(name: str, value: object) -> int:
    """An int that fits int64 (the ops' integer arguments are int64)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def non_negative(name: str, value: object) -> float:
    v = finite(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return v


def unit_interval(name: str, value: object) -> float:
    v = finite(name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return v


def flag(name: str, value: object) -> bool:
    """A bool keyword (a tensor or a string here is a caller's mistake, not a truth value)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def distinct_rows(name: str, x2d: torch.Tensor) -> None:
    """For inplace_grad: the rows of ``x2d`` (N, V), unit-stride along V, must not share memory
    (an expanded tensor's do), or the kernel would write one row's gradient over another row's
    logits while that row is still being read."""
    n, v = x2d.shape
    if n > 1 and abs(x2d.stride(0)) < v:
        raise ValueError(f"inplace_grad=True needs {name} whose rows do not share memory (row "
                         f"stride {x2d.stride(0)} < V = {v}, e.g. an expanded tensor); pass a "
                         "copy or inplace_grad=False")


def _byte_intervals(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The [start, end) byte ranges of x's storage that hold its elements: one per row along a
    unit-stride last axis (else one per element)."""
    shape, stride = (list(x.shape), list(x.stride())) if x.dim() else ([1], [1])
    length = shape[-1] if stride[-1] == 1 else 1
    lead = zip(shape[:-1], stride[:-1]) if stride[-1] == 1 else zip(shape, stride)
    offsets = torch.zeros((), dtype=torch.int64)
    for size, step in lead:
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * step
    starts = (offsets.reshape(-1) + x.storage_offset()) * x.element_size()
    return starts, starts + length * x.element_size()


def no_overlap(name: str, x: Optional[torch.Tensor], target_name: str,
               target: torch.Tensor) -> None:
    """For inplace_grad: the gradient is written over ``target`` while ``x`` is still read, so x
    must not share memory with it (a teacher sliced from the student's buffer, row r of one on row
    r - 1 of the other, was overwritten before it was read). Exact: views of one buffer that
    touch different elements (column halves, interleaved rows) are fine."""
    if x is None or x.numel() == 0 or target.numel() == 0:
        return
    if x.untyped_storage().data_ptr() != target.untyped_storage().data_ptr():
        return
    a0, a1 = _byte_intervals(x)
    b0, b1 = _byte_intervals(target)
    b0, order = b0.sort()
    reach = b1[order].cummax(0).values   # the furthest end among target ranges starting earlier
    last = torch.searchsorted(b0, a1) - 1   # the last target range starting before each x range
    hit = (last >= 0) & (reach[last.clamp_min(0)] > a0)
    if bool(hit.any()):
        raise ValueError(f"inplace_grad=True writes the gradient over {target_name}, and {name} "
                         f"shares its memory (a view of the same buffer); pass a copy of {name} "
                         "or inplace_grad=False")


def choice(name: str, value: object, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value  # type: ignore[return-value]


def labels(
    x: object, ref: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels"
) -> Optional[torch.Tensor]:
    """Labels of shape ref.shape[:-1], integer, each in [0, vocab) or == ignore_index."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if tuple(x.shape) != tuple(ref.shape[:-1]):
        raise ValueError(
            f"{name} must have shape {tuple(ref.shape[:-1])} (the logits without the vocabulary "
            f"axis), got {tuple(x.shape)}"
        )
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {ref.device}")
    # In int64, as the kernels read them: compared in a narrower dtype, an ignore_index outside
    # its range would wrap (int8: 200 == -56) and pass what the kernels then index with.
    flat = x.reshape(-1).to(torch.int64).contiguous()
    # A value check reads the data: under torch.compile it would break the graph on every call, so
    # it runs in eager mode only (compiled code is expected to have been run eagerly once).
    bad = ((flat < 0) | (flat >= vocab)) & (flat != ignore_index)
    if not torch.compiler.is_compiling() and flat.numel() and bool(bad.any()):
        first = flat[bad][0].item()
        raise ValueError(
            f"{name} must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}"
        )
    return flat
