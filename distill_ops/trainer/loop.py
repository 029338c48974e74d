"""The training loop: a transformers causal-LM student distilled from a teacher with the fused loss.

One process needs no setup; under ``torchrun`` (or any initialised default process group) the
student is wrapped in torch's DistributedDataParallel, each rank takes its slice of every global
batch, and the loss is normalised by the token count of the whole global batch, so N ranks x M
accumulation steps give the update of one batch N x M times larger.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

from . import checkpoint as ckpt_lib
from . import dist, fsdp
from .config import ConfigError, ModelLoadError, TrainConfig
from .data import (BlockDataset, StepBatches, as_dataset, load_documents, load_tokenizer,
                   next_token_labels, pack_documents, split_documents)
from .eval import autocast, evaluate
from .interrupt import StopOnSignal, TrainingInterrupted, signal_name
from .metrics import JsonlWriter, PeakMemory, read_jsonl
from .objective import (LastHidden, check_tokenizers, check_topk, check_vocab, count_tokens,
                        cross_entropy_sum, dense_loss_sum, fused_dense_loss_sum,
                        fused_sparse_loss_sum, model_dir, model_vocab, online_targets,
                        online_targets_from_hidden, sample_seed, sparse_loss_sum)
from .optim import apply_config, build_optimizer, build_scheduler

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ModelLike = Union[str, torch.nn.Module, None]
# An (n, seq_len) token tensor, or a dataset (__len__, __getitem__) of dicts with input_ids.
DatasetLike = Union[torch.Tensor, torch.utils.data.Dataset, None]


@dataclass
class TrainResult:
    model: torch.nn.Module                 # the (unwrapped) student, trained
    step: int                              # optimizer steps completed
    output_dir: str
    history: list = field(default_factory=list)   # the JSONL rows (rank 0; empty elsewhere)
    final_eval: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0              # input tokens per second of training, all ranks
    train_seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    checkpoint: Optional[str] = None       # the last checkpoint written


# ---------------------------------------------------------------------------------------------
# loading


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())


def load_model(spec: ModelLike, role: str, *, from_scratch: bool = False,
               dtype: torch.dtype = torch.float32, meta: bool = False) -> torch.nn.Module:
    """A model object as is, or a local directory loaded with AutoModelForCausalLM (never a
    download). ``from_scratch`` builds the architecture from the directory's config.json;
    ``meta`` builds it on the meta device, without weights (an FSDP2 rank that receives rank 0's:
    trainer.fsdp.shard).

    A path that does not exist is FileNotFoundError; a file, a directory without config.json or
    without weights, or one transformers cannot read is ModelLoadError naming ``role`` and the
    path."""
    if isinstance(spec, torch.nn.Module):
        return spec
    if not spec:
        raise ConfigError(f"no {role} model: set {role}= to a local model directory")
    need = ("(a local directory written by save_pretrained, with config.json and the weights, is "
            "needed: nothing is downloaded)")
    if os.path.isfile(spec):
        raise ModelLoadError(f"{role} model path {spec!r} is a file, not a model directory {need}")
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"{role} model path {spec!r} does not exist {need}")
    if not os.path.isfile(os.path.join(spec, "config.json")):
        empty = " (the directory is empty)" if not os.listdir(spec) else ""
        raise ModelLoadError(f"{role} model directory {spec!r} has no config.json{empty} {need}")
    if not from_scratch and not any(os.path.isfile(os.path.join(spec, name))
                                    for name in WEIGHT_FILES):
        hint = (" (student_from_scratch=true builds the student from config.json alone)"
                if role == "student" else "")
        raise ModelLoadError(f"{role} model directory {spec!r} holds no weights (none of "
                             f"{', '.join(WEIGHT_FILES)}){hint}")
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    # what transformers raises on a file it cannot read, with a damaged weight file's own errors
    # (a truncated model.safetensors, a pytorch_model.bin that is not a pickle)
    unreadable = (OSError, ValueError, KeyError, TypeError, SafetensorError,
                  pickle.UnpicklingError)
    try:
        if from_scratch or meta:
            config = AutoConfig.from_pretrained(spec, local_files_only=True)
            with torch.device("meta") if meta else contextlib.nullcontext():
                return AutoModelForCausalLM.from_config(config, dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, dtype=dtype)
    except unreadable as exc:
        raise ModelLoadError(f"cannot load the {role} model from {spec!r}: {_one_line(exc)}") \
            from exc


class _Subset:
    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def _split_dataset(dataset, fraction: float, seed: int):
    n = len(dataset)
    n_eval = int(round(n * fraction))
    if fraction <= 0 or n_eval == 0:
        return dataset, None
    g = torch.Generator().manual_seed(seed + 17)
    perm = torch.randperm(n, generator=g).tolist()
    return _Subset(dataset, sorted(perm[n_eval:])), _Subset(dataset, sorted(perm[:n_eval]))


def build_datasets(cfg: TrainConfig, tokenizer, student_vocab: int,
                   device: Optional[torch.device] = None):
    """(train, eval) datasets from the config: packed text blocks, or the offline target cache
    (``device`` carries the ranks' vote on its verification: dist.agreed)."""
    if cfg.targets == "cache":
        try:
            from ..targets.cache import TargetCache
        except ImportError as exc:
            raise RuntimeError(f"targets='cache' needs distill_ops.targets.cache ({exc})") from None
        if not os.path.exists(cfg.cache):
            raise FileNotFoundError(f"target cache {cfg.cache!r} does not exist")
        from ..targets.cache import (check_tail_mode, read_manifest, tokenizer_hashes,
                                     warn_other_temperature)

        manifest = read_manifest(cfg.cache) or {}
        check_tail_mode(manifest, cfg.tail, cfg.cache)
        expect = student_vocab if cfg.vocab == "strict" else None
        # the cache must come from the student's tokenizer when both record one
        tok_dir = cfg.tokenizer or (cfg.student if isinstance(cfg.student, str) else None)
        # (its vocabulary: a re-saved tokenizer, another chat template, still matches)
        tok_hashes = tokenizer_hashes(tok_dir) if tok_dir and os.path.isdir(tok_dir) else ()
        expect_hash = tok_hashes if tok_hashes and manifest.get("tokenizer_hash") else None
        # the shards' sha256 once per node (each rank hashing every shard multiplied the
        # start-up read by the ranks): local rank 0 verifies, the others wait for it
        # (a shard that fails it raises on every rank: agreed)
        verify = dist.local_rank() == 0
        cache = dist.agreed(lambda: TargetCache(
            cfg.cache, expect_vocab_size=expect, expect_tokenizer_hash=expect_hash,
            verify=verify), device)
        _check_cache_seq_len(cfg, cache)
        warn_other_temperature(manifest, cfg.temperature, "the cache", "the loss uses temperature")
        if cfg.eval_data:
            return cache, BlockDataset(pack_documents(load_documents(cfg.eval_data), tokenizer,
                                                      cfg.seq_len))
        return _split_dataset(cache, cfg.eval_fraction, cfg.seed)
    if not cfg.train_data:
        raise ConfigError("no training data: set train_data (a .txt/.jsonl file or directory, or "
                          "builtin:pydoc)")
    if tokenizer is None:
        raise ConfigError("text data needs a tokenizer: set tokenizer= (or a student directory "
                          "that holds one)")
    docs = load_documents(cfg.train_data)
    if cfg.eval_data:
        eval_docs = load_documents(cfg.eval_data)
    elif cfg.eval_fraction > 0 and len(docs) > 1:
        docs, eval_docs = split_documents(docs, cfg.eval_fraction, cfg.seed)
    else:
        eval_docs = []
    train = BlockDataset(pack_documents(docs, tokenizer, cfg.seq_len))
    evald = BlockDataset(pack_documents(eval_docs, tokenizer, cfg.seq_len)) if eval_docs else None
    if evald is None and cfg.eval_fraction > 0 and len(docs) == 1:
        train, evald = _split_dataset(train, cfg.eval_fraction, cfg.seed)
    return train, evald


def _check_cache_seq_len(cfg: TrainConfig, cache) -> None:
    """The cache holds the training sequences: a seq_len the user set (anything but the default)
    must be their length, unless eval_data is given (seq_len then packs the evaluation text)."""
    default = TrainConfig.__dataclass_fields__["seq_len"].default
    if cfg.seq_len == default or cfg.eval_data or len(cache) == 0:
        return
    n_seq, n_tok = int(cache.manifest["num_sequences"]), int(cache.manifest["num_tokens"])
    if n_tok != cfg.seq_len * n_seq:
        length = (f"{n_tok // n_seq}" if n_tok % n_seq == 0 else
                  f"{n_tok / n_seq:.1f} on average")
        raise ConfigError(f"seq_len={cfg.seq_len} but the target cache {cfg.cache!r} holds "
                          f"sequences of length {length} (the cache fixes the data): set seq_len "
                          "to that or leave it unset")


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.bf16 == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None
    return torch.bfloat16 if cfg.bf16 else None


# ---------------------------------------------------------------------------------------------
# the loop


def train(config: Union[TrainConfig, dict[str, Any]], *, student: ModelLike = None,
          teacher: ModelLike = None, tokenizer: Optional[PreTrainedTokenizerBase] = None,
          train_dataset: DatasetLike = None, eval_dataset: DatasetLike = None) -> TrainResult:
    """Distil (or, with ``targets="none"``, plainly train) a causal-LM student.

    Models and data come from the config's paths unless given as objects: ``student``/``teacher``
    (nn.Module or local directory), ``tokenizer``, ``train_dataset``/``eval_dataset`` (an
    (n, seq_len) token tensor, or a dataset of dicts with ``input_ids`` and, for cached targets,
    ``ids``, ``logprobs``, ``tail_logmass``).
    """
    cfg = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    cfg.validate()
    dist.init_from_env(cfg.device)
    device = dist.pick_device(cfg.device)
    rank, world = dist.rank(), dist.world_size()
    stale: list[str] = []   # an earlier run's checkpoints, deleted under overwrite_output_dir
    if not cfg.resume_from:   # checked before anything is loaded
        stale = ckpt_lib.check_output_dir(cfg.output_dir, None, None, cfg.overwrite_output_dir)
    main = rank == 0
    # FSDP2 with several processes (trainer/fsdp.py); with one it would shard over one rank
    sharded = cfg.fsdp and world > 1
    torch.manual_seed(cfg.seed)
    amp_dtype = _amp_dtype(cfg, device)

    # models ------------------------------------------------------------------------------
    # Sharded, rank 0 alone reads (or initialises) a model given as a directory; the other ranks
    # build it on the meta device and receive rank 0's weights as it is sharded (fsdp.shard).
    def from_files(spec: ModelLike) -> bool:
        return isinstance(spec, (str, os.PathLike))

    def load(spec: ModelLike, role: str, **kw: Any) -> torch.nn.Module:
        if not sharded:
            return load_model(spec, role, **kw)
        # (rank 0 may fail alone, on a file the others never read: all raise together)
        meta = rank != 0 and from_files(spec)
        return dist.agreed(lambda: load_model(spec, role, meta=meta, **kw), device)

    student_spec = student if student is not None else cfg.student
    student = load(student_spec, "student", from_scratch=cfg.student_from_scratch)
    student.train()
    if hasattr(student, "config"):
        student.config.use_cache = False
    if cfg.gradient_checkpointing:
        if hasattr(student, "activation_checkpointing_enable"):   # the transformers 5 name
            student.activation_checkpointing_enable({"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    # On its device (sharded) before the teacher loads: one whole model at a time in host memory.
    student = (fsdp.shard(student, device, from_rank0=from_files(student_spec))
               if sharded else student.to(device))
    need_teacher = cfg.targets in ("dense", "topk", "sample")
    if need_teacher or teacher is not None or cfg.teacher:
        teacher_dtype = amp_dtype if (amp_dtype is not None and device.type == "cuda") else None
        teacher_spec = teacher if teacher is not None else cfg.teacher
        teacher = load(teacher_spec, "teacher", dtype=teacher_dtype or torch.float32)
        teacher.eval().requires_grad_(False)
        # sharded: the shards move to the device (fsdp.shard), never the whole model
        teacher = (fsdp.shard(teacher, device, from_rank0=from_files(teacher_spec))
                   if sharded else teacher.to(device))
        check_vocab(cfg, model_vocab(student), model_vocab(teacher))
        check_topk(cfg, model_vocab(student), model_vocab(teacher))
        check_tokenizers(cfg, cfg.tokenizer or model_dir(student_spec, student),
                         model_dir(teacher_spec, teacher))
    else:
        teacher = None
    if tokenizer is None:
        tok_path = cfg.tokenizer or (cfg.student if isinstance(cfg.student, str) else None)
        if tok_path and (cfg.tokenizer or train_dataset is None):
            if cfg.tokenizer or os.path.isfile(os.path.join(tok_path, "tokenizer_config.json")):
                tokenizer = load_tokenizer(tok_path)
    student_vocab = model_vocab(student)

    # data --------------------------------------------------------------------------------
    train_ds, eval_ds = as_dataset(train_dataset), as_dataset(eval_dataset)
    if train_ds is None:
        train_ds, built_eval = build_datasets(cfg, tokenizer, student_vocab, device)
        eval_ds = eval_ds if eval_ds is not None else built_eval
    batches = StepBatches(train_ds, cfg.micro_batch_size, cfg.grad_accum_steps, rank=rank,
                          world_size=world, seed=cfg.seed)

    # model, optimizer, resume -------------------------------------------------------------
    optimizer = build_optimizer(student, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    step = 0
    counters = _Counters()
    resume = ckpt_lib.resolve_resume(cfg.resume_from, cfg.output_dir)
    if resume:
        state = ckpt_lib.load_checkpoint(resume, student, optimizer, scheduler,
                                         config=cfg.to_dict(), sharded=sharded)
        step = int(state["step"])
        stale = ckpt_lib.check_output_dir(cfg.output_dir, resume, step, cfg.overwrite_output_dir)
        apply_config(optimizer, scheduler, cfg, step)   # the new lr, weight decay, ... from now on
        counters = _Counters.resumed(state, main)
    # With fused_linear the loop runs the models without their lm_heads (the loss applies them).
    model = LastHidden(student, through_root=sharded) if cfg.fused_linear else student
    teacher_fwd = (LastHidden(teacher, through_root=sharded)
                   if cfg.fused_linear and teacher is not None else teacher)
    ddp = world > 1 and not sharded
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if main:
        for path in stale:   # overwrite_output_dir: the run starts writing, their time is up
            shutil.rmtree(path)
        os.makedirs(cfg.output_dir, exist_ok=True)
        cfg.save_yaml(os.path.join(cfg.output_dir, "config.yaml"))
    writer = JsonlWriter(os.path.join(cfg.output_dir, "metrics.jsonl"),
                         resume_step=step if resume else None) if main else None

    def run_eval(at_step: int, full: bool) -> dict:
        if eval_ds is None or len(eval_ds) == 0:
            return {}
        out = evaluate(student, eval_ds, batch_size=cfg.micro_batch_size, device=device,
                       teacher=teacher, amp_dtype=amp_dtype, limit=0 if full else cfg.eval_batches,
                       backend=cfg.backend)
        if sharded and teacher is not None:
            fsdp.reshard(teacher)
        if writer:
            writer.write({"step": at_step, **out})
        return out

    def save(at_step: int) -> str:
        return ckpt_lib.save_checkpoint(cfg.output_dir, at_step, student, optimizer, scheduler,
                                        config=cfg.to_dict(), tokenizer=tokenizer,
                                        keep=cfg.keep_checkpoints,
                                        extra={"metrics": counters.saved(device)},
                                        sharded=sharded, device=device)

    progress = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=step, desc="distill" if teacher is not None
                        or cfg.targets == "cache" else "train", dynamic_ncols=True)

    final_eval: dict = {}
    last_ckpt = None
    saved_step = step if resume else -1   # the step of the newest checkpoint on disk
    stop_signum = 0
    peak = PeakMemory(device)
    # SIGINT/SIGTERM: finish the step in progress, checkpoint it, raise TrainingInterrupted
    with peak, StopOnSignal() as stopper:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            micro = batches.micro_batches(step)
            labels_list = [next_token_labels(b) for b in micro]
            local_tokens = sum(count_tokens(lab) for lab in labels_list)
            # the input tokens (padding left out) of every rank, for tokens and tokens_per_s
            local_inputs = sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                               else b["input_ids"].numel() for b in micro)
            global_tokens, global_inputs = dist.all_reduce_sum([local_tokens, local_inputs],
                                                               device)
            # mean over the global batch's labelled tokens; DDP averages over ranks, hence * world.
            scale = world / max(global_tokens, 1.0)
            lr = scheduler.get_last_lr()[0]
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for a, (batch, labels) in enumerate(zip(micro, labels_list)):
                last_micro = a == len(micro) - 1
                if sharded:   # FSDP2: reduce-scatter the gradients after the last micro-batch
                    fsdp.set_gradient_sync(student, last_micro)
                sync = model.no_sync() if ddp and not last_micro else contextlib.nullcontext()
                with sync:
                    seed = functools.partial(sample_seed, cfg, step, a, rank)
                    loss_sum = _micro_step(cfg, model, teacher_fwd, batch, labels.to(device),
                                           device, amp_dtype, student_vocab, seed)
                    if sharded and teacher is not None:
                        fsdp.reshard(teacher)
                    (loss_sum * scale).backward()
                step_loss += loss_sum.detach().double()
            counters.seen_tokens += int(global_inputs)
            max_norm = cfg.grad_clip if cfg.grad_clip else float("inf")   # 0 or None: no clipping
            grad_norm = fsdp.full_norm(torch.nn.utils.clip_grad_norm_(student.parameters(),
                                                                      max_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            counters.train_seconds += time.perf_counter() - t0
            counters.log_loss += float(step_loss)
            counters.log_tokens += local_tokens

            last = step == cfg.max_steps
            if cfg.log_every and (step % cfg.log_every == 0 or last):
                total_loss, total_tokens = dist.all_reduce_sum(
                    [counters.log_loss, counters.log_tokens], device)
                row = {"step": step, "loss": total_loss / max(total_tokens, 1.0), "lr": lr,
                       "grad_norm": float(grad_norm), "epoch": round(batches.epoch_of(step), 4),
                       "tokens": counters.seen_tokens, "tokens_per_s": counters.tokens_per_s(),
                       "elapsed_s": round(counters.train_seconds, 3)}
                if writer:
                    writer.write(row)
                if progress:
                    progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
                counters.log_loss = counters.log_tokens = 0.0
            if progress:
                progress.update(1)
            if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                final_eval = run_eval(step, full=last)   # the last one on the whole eval set
                if progress and final_eval:
                    progress.write(f"step {step}: " + ", ".join(
                        f"{k[5:]}={v:.4g}" for k, v in final_eval.items() if k != "eval_tokens"))
            if (cfg.save_every and step % cfg.save_every == 0) or (last and cfg.save_final):
                last_ckpt = save(step)
                saved_step = step
            stop_signum = _agreed_stop(stopper.signum, device)
            if stop_signum and last:
                # the run is complete (final evaluation and save done): it ends as a finished run
                if main:
                    warnings.warn(f"{signal_name(stop_signum)} received during the last step "
                                  f"({step} of {cfg.max_steps}): the run is complete and ends "
                                  "normally", RuntimeWarning, stacklevel=2)
                stop_signum = 0
            if stop_signum:
                if saved_step != step:
                    last_ckpt = save(step)
                    saved_step = step
                break
    if progress:
        progress.close()
    if stop_signum:
        if main:
            print(f"distill-ops train: {signal_name(stop_signum)} received: stopped after step "
                  f"{step} of {cfg.max_steps}, checkpoint saved to {last_ckpt} (continue with "
                  "resume_from=latest)", file=sys.stderr, flush=True)
        raise TrainingInterrupted(stop_signum, step, last_ckpt)

    history: list = []
    if main:
        history = read_jsonl(writer.path)
        if cfg.plot:
            from .plot import plot_metrics

            plot_metrics({"student": history}, os.path.join(cfg.output_dir, "loss.png"))
    return TrainResult(model=student, step=step, output_dir=cfg.output_dir, history=history,
                       final_eval=final_eval, tokens_per_s=counters.tokens_per_s(),
                       train_seconds=counters.train_seconds, peak_memory_bytes=peak.peak_bytes,
                       peak_memory_kind=peak.kind, checkpoint=last_ckpt)


@dataclass
class _Counters:
    """The running sums behind metrics.jsonl's rows, saved in each checkpoint so that a resumed
    run logs what the uninterrupted one would (the loss averaged since the last logged step,
    cumulative tokens, tokens/s and elapsed_s) instead of starting them over."""
    seen_tokens: int = 0          # input tokens (not padding) of all ranks
    train_seconds: float = 0.0    # this rank's time in training steps
    log_loss: float = 0.0         # this rank's loss sum since the last logged row
    log_tokens: float = 0.0       # and its labelled tokens

    def tokens_per_s(self) -> float:
        return self.seen_tokens / max(self.train_seconds, 1e-9)

    def saved(self, device: torch.device) -> dict:
        """What a checkpoint keeps (every rank calls it: the unlogged sums are summed over the
        ranks, since rank 0 alone writes the trainer state)."""
        log_loss, log_tokens = dist.all_reduce_sum([self.log_loss, self.log_tokens], device)
        return {"seen_tokens": self.seen_tokens, "train_seconds": self.train_seconds,
                "log_loss": log_loss, "log_tokens": log_tokens}

    @classmethod
    def resumed(cls, state: dict, main: bool) -> "_Counters":
        """From a checkpoint's trainer state (zeros for one written before they were saved); the
        global unlogged sums go to rank 0 only, as the next row's all-reduce adds the ranks."""
        saved = (state.get("extra") or {}).get("metrics") or {}
        return cls(seen_tokens=int(saved.get("seen_tokens", 0)),
                   train_seconds=float(saved.get("train_seconds", 0.0)),
                   log_loss=float(saved.get("log_loss", 0.0)) if main else 0.0,
                   log_tokens=float(saved.get("log_tokens", 0.0)) if main else 0.0)


def _agreed_stop(signum: Optional[int], device: torch.device) -> int:
    """The signal every rank stops on after this step (0: go on). With several processes each
    rank says whether it got SIGINT or SIGTERM and all stop at the same step if any did (SIGINT
    wins); one process asks nobody."""
    votes = [float(signum == signal.SIGINT), float(signum == signal.SIGTERM)]
    if dist.active() and dist.world_size() > 1:
        votes = dist.all_reduce_sum(votes, device)
    if votes[0] > 0:
        return int(signal.SIGINT)
    if votes[1] > 0:
        return int(signal.SIGTERM)
    return 0


def _micro_step(cfg: TrainConfig, model, teacher, batch: dict, labels: torch.Tensor,
                device: torch.device, amp_dtype, student_vocab: int,
                seed: Callable[..., int]) -> torch.Tensor:
    """Forward one micro-batch and return its loss summed over labelled tokens (``seed(chunk)``:
    the seed of sampled targets for a chunk of the batch's rows)."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch.get("attention_mask")
    mask = mask.to(device, non_blocking=True) if mask is not None else None
    if cfg.fused_linear:   # model and teacher are LastHidden (model maybe inside DDP)
        heads = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) \
            else model
        with autocast(device, amp_dtype):
            hidden = model(input_ids=input_ids, attention_mask=mask)
            if cfg.targets == "cache":
                return fused_sparse_loss_sum(
                    cfg, hidden, heads, batch["ids"].to(device), batch["logprobs"].to(device),
                    batch["tail_logmass"].to(device) if "tail_logmass" in batch else None, labels)
            with torch.no_grad():
                t_hidden = teacher(input_ids=input_ids, attention_mask=mask)
            if cfg.targets == "dense":
                return fused_dense_loss_sum(cfg, hidden, heads, t_hidden, teacher, labels)
            with torch.no_grad():   # topk, sample
                targets = online_targets_from_hidden(cfg, t_hidden, teacher, student_vocab, seed)
            del t_hidden
            return fused_sparse_loss_sum(cfg, hidden, heads, targets.ids, targets.logprobs,
                                         targets.tail_logmass, labels)
    with autocast(device, amp_dtype):
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        if cfg.targets in ("dense", "topk", "sample"):
            with torch.no_grad():
                t_logits = teacher(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    if cfg.targets == "none":
        return cross_entropy_sum(logits, labels)
    if cfg.targets == "dense":
        return dense_loss_sum(cfg, logits, t_logits, labels)
    if cfg.targets in ("topk", "sample"):
        with torch.no_grad():
            targets = online_targets(cfg, t_logits, student_vocab, seed())
        del t_logits
        return sparse_loss_sum(cfg, logits, targets.ids, targets.logprobs, targets.tail_logmass,
                               labels)
    # cache
    return sparse_loss_sum(cfg, logits, batch["ids"].to(device), batch["logprobs"].to(device),
                           batch["tail_logmass"].to(device) if "tail_logmass" in batch else None,
                           labels)
