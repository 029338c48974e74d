"""The trainer's configuration: one dataclass, loadable from YAML or command-line flags.

Unknown keys are an error that names the key (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union

TARGETS = ("dense", "topk", "sample", "cache", "none")
TAILS = ("renorm", "tail")
VOCAB_MODES = ("strict", "common_prefix")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


class ModelLoadError(OSError):
    """A student or teacher directory cannot be loaded (trainer.loop.load_model); the message names
    the model, the path and the cause (the original exception is chained)."""


@dataclass
class TrainConfig:
    """Everything a distillation run needs.

    Models
        student: local directory of a transformers causal LM (``save_pretrained`` output).
        student_from_scratch: build the student from ``student``'s config.json with fresh weights.
        teacher: local directory of the teacher (not needed with ``targets="cache"``/``"none"``).
        tokenizer: local tokenizer directory; defaults to ``student``.
    Teacher targets
        targets: ``dense`` (online teacher logits, kd_loss), ``topk`` (online top-k targets,
            sparse_kd_loss), ``sample`` (online sampled targets, teacher_sample: unbiased
            importance weights, fresh draws every micro-batch), ``cache`` (offline target cache
            at ``cache``), ``none`` (plain cross-entropy on the labels: the baseline).
        topk: k for ``targets="topk"``.  tail: ``renorm`` or ``tail`` (sparse losses).
        num_samples, proposal_temperature: draws per token and the proposal's temperature for
            ``targets="sample"`` (seeded from ``seed``, the step, the micro-batch and the rank,
            so a resumed run draws what the uninterrupted one would).
        fused_linear: compute the loss from the models' last hidden states and lm_heads
            (fused_linear_kd_loss, fused_linear_sparse_kd_loss): no (tokens x V) logits are
            materialised (targets dense, topk, sample or cache).
        inplace_grad: without fused_linear, the loss writes its gradient over the student's
            logits (one tokens x V buffer less; equal vocabularies). Turn it off for a model whose
            forward keeps its own logits for its backward (autograd then says a tensor "has been
            modified by an inplace operation").
    Loss (see distill_ops.kd_loss)
        divergence, temperature, beta, alpha, hard_weight, soft_weight, scale_temperature, softcap,
        vocab (``strict`` or ``common_prefix``), backend.
    Data
        train_data: a .txt file, a .jsonl file (``text`` field), a directory of those, or
            ``builtin:pydoc`` (Python's own documentation, always present).
        eval_data: same forms; without it ``eval_fraction`` of the training sequences is held out
            (of train_data's; ``train(train_dataset=...)`` holds out nothing: pass eval_dataset).
        seq_len: tokens per training sequence (documents are packed, separated by EOS).
        With ``targets="cache"`` the cache fixes the training data: train_data is an error, and a
        seq_len set to other than its default must equal the cache's sequence length (unless
        eval_data is given: it then packs the evaluation text).
    Optimisation
        micro_batch_size (per process), grad_accum_steps, max_steps, lr, min_lr_ratio (cosine
        decays to lr * min_lr_ratio), warmup_steps (at most max_steps), weight_decay, adam_beta1/2
        (in [0, 1)), adam_eps, grad_clip (0 or None disables), bf16 (``auto``: on a GPU that
        supports it), gradient_checkpointing, seed, device (``auto``, ``cpu``, ``cuda``,
        ``cuda:<n>``, ...), fsdp (with several processes: FSDP2 shards both models' parameters,
        the student's gradients and optimizer state over the ranks instead of DDP's replicas;
        trainer/fsdp.py).
        On a resume the optimizer settings (lr, min_lr_ratio, warmup_steps, max_steps,
        weight_decay, adam_*) are the resuming config's, from its first step.
    Output
        output_dir, log_every, eval_every (0: only at the end), eval_batches (micro-batches
        per periodic evaluation, over all ranks, 0: all; the final one always uses the whole
        eval set), save_every (0: only at the end), keep_checkpoints, resume_from (``latest``,
        a checkpoint directory, or empty), overwrite_output_dir (a new run deletes the
        checkpoints of an earlier run in output_dir, and a resume those past its step, instead
        of refusing to start), progress (tqdm bar), plot (loss-curve PNG).
        extra: free-form notes, recorded with the rest of the config (output_dir/config.yaml and
        each checkpoint's trainer state).
    """

    # models
    student: Optional[str] = None
    student_from_scratch: bool = False
    teacher: Optional[str] = None
    tokenizer: Optional[str] = None
    # teacher targets
    targets: str = "dense"
    fused_linear: bool = False
    inplace_grad: bool = True
    cache: Optional[str] = None
    topk: int = 64
    num_samples: int = 64
    proposal_temperature: float = 1.0
    tail: str = "renorm"
    # loss
    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    scale_temperature: bool = True
    softcap: Optional[float] = None
    vocab: str = "strict"
    backend: str = "auto"
    # data
    train_data: Optional[str] = None
    eval_data: Optional[str] = None
    eval_fraction: float = 0.05
    seq_len: int = 256
    # optimisation
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: Optional[float] = 1.0   # 0 or None: no clipping
    bf16: Union[str, bool] = "auto"
    gradient_checkpointing: bool = False
    fsdp: bool = False
    seed: int = 0
    device: str = "auto"
    # output
    output_dir: str = "distill_out"
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    save_final: bool = True
    resume_from: Optional[str] = None
    overwrite_output_dir: bool = False
    progress: bool = True
    plot: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes, saved with the config

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check every value and their combinations (ConfigError naming the field); returns self.
        Runs on construction; train() runs it again (fields may have been set since)."""
        from ..constants import DIVERGENCES
        from ..backends import BACKENDS

        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {tuple(allowed)}, got {value!r}")

        choice("targets", TARGETS)
        choice("tail", TAILS)
        choice("divergence", DIVERGENCES)
        choice("vocab", VOCAB_MODES)
        choice("backend", BACKENDS)
        if self.bf16 not in ("auto", True, False):
            raise ConfigError(f"bf16 must be 'auto', true or false, got {self.bf16!r}")
        for name in ("micro_batch_size", "grad_accum_steps", "max_steps", "seq_len", "topk",
                     "num_samples"):
            if self._integer(name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("log_every", "eval_every", "eval_batches", "save_every", "warmup_steps",
                     "keep_checkpoints"):
            if self._integer(name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        self._integer("seed")
        if self.warmup_steps > self.max_steps:   # == is a run that is all warmup: allowed
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must be <= max_steps "
                              f"({self.max_steps}): the warmup would outlast the run")
        for name in ("temperature", "lr", "adam_eps", "proposal_temperature"):
            if self._number(name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("hard_weight", "soft_weight", "weight_decay"):
            if self._number(name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("min_lr_ratio", "beta", "alpha"):   # the loss's own ranges (kd_loss)
            if not 0.0 <= self._number(name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= self._number(name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self._number("eval_fraction") < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        # None and 0 both disable clipping (None: a YAML null)
        if self.grad_clip is not None and self._number("grad_clip") < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 or None: no clipping), got "
                              f"{self.grad_clip!r}")
        if self.softcap is not None and self._number("softcap") <= 0:
            raise ConfigError(f"softcap must be > 0 (or None: no softcap), got {self.softcap!r}")
        _check_device(self.device)
        for name in ("fused_linear", "inplace_grad", "overwrite_output_dir", "fsdp"):
            if not isinstance(getattr(self, name), bool):   # 1 == True, but 1 is no flag
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.fused_linear and self.targets == "none":
            raise ConfigError("fused_linear needs teacher targets (dense, topk, sample or "
                              "cache), not targets='none'")
        if self.targets == "sample" and self.tail != "renorm":
            raise ConfigError("targets='sample' needs tail='renorm' (importance weights stand for "
                              "the whole distribution: there is no tail mass)")
        if self.targets == "cache" and not self.cache:
            raise ConfigError("targets='cache' needs cache (the directory written by "
                              "cache-teacher)")
        if self.targets == "cache" and self.train_data:
            raise ConfigError(f"targets='cache' trains on the sequences stored in the cache "
                              f"({self.cache}), so train_data={self.train_data!r} would not be "
                              "used: remove train_data (the cache fixes the data)")
        return self

    def _integer(self, name: str) -> int:
        """The int field ``name``, or ConfigError: 2.5 or True (the Python API does not coerce)
        must not pass as a step count."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(value)

    def _number(self, name: str) -> float:
        """The float field ``name`` if it is a finite number, else ConfigError (NaN compares
        False with every bound, so range checks alone let it through)."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value!r}")
        return float(value)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data: what save_yaml writes and checkpoints record; from_dict
        reads it back."""
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping; an unknown key raises ConfigError naming it (and a close match)."""
        if not isinstance(data, Mapping):
            raise ConfigError("a config must be a mapping of keys to values, got "
                              f"{type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
            values[name] = _coerce(known[name], value)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str, overrides: Optional[Mapping[str, Any]] = None) -> "TrainConfig":
        """Load a YAML mapping of fields; ``overrides`` (e.g. command-line flags) replace its
        values before validation. A missing file is FileNotFoundError, a bad key or malformed YAML ConfigError."""
        import yaml

        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:  # (not a ValueError: the CLI would print a traceback)
                raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level of a config must be a mapping")
        data = dict(data)
        data.update(overrides or {})
        return cls.from_dict(data)

    def save_yaml(self, path: str) -> None:
        """Write the config as YAML in field order; train() records its run so, in
        output_dir/config.yaml, and from_yaml reads it back."""
        import yaml

        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)


def _check_device(device: Any) -> None:
    """``auto`` or a string torch.device parses (ConfigError naming ``device`` otherwise). Whether
    that device exists here is dist.pick_device's check, when the run starts."""
    if device == "auto":
        return
    import torch

    try:
        if not isinstance(device, str):
            raise TypeError
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:<index>' or another "
                          f"torch device string, got {device!r}") from None


def _field_type(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Turn strings from the command line (or loosely typed YAML) into the field's type."""
    kind = _field_type(f)
    if value is None:
        return None
    if f.name == "bf16":
        if isinstance(value, str) and value.lower() != "auto":
            return _to_bool(f.name, value)
        return value
    try:
        if kind == "bool":
            return _to_bool(f.name, value)
        if kind == "int":
            # (YAML's `true` is a bool, which int() would take for 1)
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "Optional[float]":
            return None if str(value).lower() in ("none", "null", "") else float(value)
        if kind in ("Optional[str]", "str"):
            if kind == "Optional[str]" and str(value).lower() in ("none", "null", ""):
                return None
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{f.name} expects {kind}, got {value!r}") from None
    return value


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} expects a boolean, got {value!r}")


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
