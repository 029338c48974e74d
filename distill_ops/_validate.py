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
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
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
    # A value check reads the data: under torch.compile it would break the graph on every call, so
    # it runs in eager mode only (compiled code is expected to have been run eagerly once).
    bad = ((x < 0) | (x >= vocab)) & (x != ignore_index)
    if not torch.compiler.is_compiling() and x.numel() and bool(bad.any()):
        first = x[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}"
        )
    return x.reshape(-1).to(torch.int64).contiguous()
