"""What is measured: the same loss computed by each provider.

Baselines are written the way users write them: log_softmax in fp32 of both sides, then
``F.kl_div(..., log_target=True)`` (forward and reverse KL; the skew KLs against the mixture's log
built with ``torch.logaddexp`` of the weighted log-probabilities), TRL's ``generalized_jsd_loss``
form for JSD and the generalized JSD, ``F.cross_entropy`` for the hard-label term;
``torch-compile`` is torch.compile of exactly those functions; ``liger`` feeds the same fp32
log-probabilities to Liger-Kernel's KL / JSD losses (it has no skew KL: those rows say so).
``distill_ops:<backend>`` calls the public API with that backend forced.

The sparse suite: forward KL against the student's full-vocabulary softmax; every other divergence
(as distill_ops.sparse_kd_loss with tail="renorm") between the teacher and the student both
renormalised over the k target ids: the student's logits gathered there, then the dense forms.

Every provider's function takes the input dict of inputs.py and returns the scalar loss (topk: the
ids and log-probabilities). All losses are means over rows (batchmean), at ``TEMPERATURE``.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

TEMPERATURE = 1.0
JSD_BETA = 0.5      # jsd and generalized_jsd (TRL's convention: 0 forward KL, 1 reverse KL)
# skew_forward_kl: KL(p || a p + (1-a) q); skew_reverse_kl: KL(q || (1-a) p + a q)
SKEW_ALPHA = 0.1
HARD_WEIGHT = 1.0


class Unavailable(Exception):
    """The provider cannot run here (not installed, not built, wrong device): an 'unavailable' row."""


class Missing(Exception):
    """The distill_ops API this row needs does not exist yet: a 'missing' row."""


# ----------------------------------------------------------------------------- eager PyTorch

def _log_probs(student, teacher, temperature: float):
    return (F.log_softmax(student.float() / temperature, dim=-1),
            F.log_softmax(teacher.float() / temperature, dim=-1))


def forward_kl_logprobs(log_q, log_p):
    """KL(p || q) from log-probabilities, mean over rows: kl_div with a log target."""
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def reverse_kl_logprobs(log_q, log_p):
    """KL(q || p): the same kl_div with the roles swapped (the gradient flows through the
    target)."""
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


def skew_forward_kl_logprobs(log_q, log_p, alpha: float = SKEW_ALPHA):
    """KL(p || M), M = alpha p + (1 - alpha) q: log M as a logaddexp of the weighted
    log-probabilities (no underflow of M), then kl_div with a log target."""
    log_m = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
    return F.kl_div(log_m, log_p, reduction="batchmean", log_target=True)


def skew_reverse_kl_logprobs(log_q, log_p, alpha: float = SKEW_ALPHA):
    """KL(q || M), M = (1 - alpha) p + alpha q (the skew mixes in the student itself)."""
    log_m = torch.logaddexp(log_p + math.log1p(-alpha), log_q + math.log(alpha))
    return F.kl_div(log_m, log_q, reduction="batchmean", log_target=True)


# The KL-type divergences from log-probabilities (the JSDs go through generalized_jsd_loss below).
KL_LOGPROBS = {"forward_kl": forward_kl_logprobs, "reverse_kl": reverse_kl_logprobs,
               "skew_forward_kl": skew_forward_kl_logprobs,
               "skew_reverse_kl": skew_reverse_kl_logprobs}


def eager_forward_kl(student, teacher, temperature: float = TEMPERATURE):
    """KL(p || q) as users write it: fp32 log-softmax of both, kl_div with a log target."""
    return forward_kl_logprobs(*_log_probs(student, teacher, temperature)) * temperature ** 2


def eager_reverse_kl(student, teacher, temperature: float = TEMPERATURE):
    """KL(q || p) as users write it."""
    return reverse_kl_logprobs(*_log_probs(student, teacher, temperature)) * temperature ** 2


def eager_skew_forward_kl(student, teacher, temperature: float = TEMPERATURE,
                          alpha: float = SKEW_ALPHA):
    """Skew forward KL as users write it (fp32 log-softmax, logaddexp mixture, kl_div)."""
    return (skew_forward_kl_logprobs(*_log_probs(student, teacher, temperature), alpha)
            * temperature ** 2)


def eager_skew_reverse_kl(student, teacher, temperature: float = TEMPERATURE,
                          alpha: float = SKEW_ALPHA):
    """Skew reverse KL as users write it."""
    return (skew_reverse_kl_logprobs(*_log_probs(student, teacher, temperature), alpha)
            * temperature ** 2)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta: float = 0.5,
                         temperature: float = 1.0, reduction: str = "batchmean"):
    """The generalized JSD in the form of TRL's GKD trainer (written here, not imported).

    beta = 0 is KL(p || q), beta = 1 is KL(q || p); otherwise, with M = beta p + (1 - beta) q,
    beta KL(p || M) + (1 - beta) KL(q || M), the mixture's log built with logsumexp over a stack.
    """
    s = student_logits / temperature
    t = teacher_logits / temperature
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    if beta == 0:
        per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    elif beta == 1:
        per_token = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=log_q.dtype, device=log_q.device)
        log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(-b), log_p + torch.log(b)]), dim=0)
        kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True)
        kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True)
        per_token = b * kl_p + (1 - b) * kl_q
    mask = None
    if labels is not None:
        mask = labels != -100
        per_token = per_token[mask]
    if reduction == "batchmean":
        rows = mask.sum() if mask is not None else per_token.numel() // per_token.shape[-1]
        return per_token.sum() / rows
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.mean()
    return per_token


def eager_jsd(student, teacher, temperature: float = TEMPERATURE, beta: float = JSD_BETA):
    """JSD(beta) in TRL's form. Upcast first, as with the KL baselines (fp32 log-probabilities);
    TRL leaves out the tau^2 factor that distill_ops (scale_temperature=True) and the KL baselines
    apply, so it is multiplied in here."""
    return generalized_jsd_loss(student.float(), teacher.float(), beta=beta,
                                temperature=temperature) * temperature ** 2


def eager_generalized_jsd(student, teacher, temperature: float = TEMPERATURE,
                          beta: float = JSD_BETA):
    """distill_ops' ``generalized_jsd`` is TRL's GKD loss itself (beta 0 forward KL, 1 reverse KL,
    in between JSD(beta)): TRL's generalized_jsd_loss form, every beta."""
    return eager_jsd(student, teacher, temperature, beta)


EAGER = {"forward_kl": eager_forward_kl, "reverse_kl": eager_reverse_kl, "jsd": eager_jsd,
         "skew_forward_kl": eager_skew_forward_kl, "skew_reverse_kl": eager_skew_reverse_kl,
         "generalized_jsd": eager_generalized_jsd}


def eager_dense(divergence: str, hard_label: bool) -> Callable:
    soft = EAGER[divergence]
    if not hard_label:
        def loss(student, teacher):
            return soft(student, teacher)
    else:
        def loss(student, teacher, labels):
            return soft(student, teacher) + HARD_WEIGHT * F.cross_entropy(student.float(), labels)
    return loss


def eager_linear(divergence: str, hard_label: bool) -> Callable:
    """The fused-linear suite as users write it: both lm_heads (F.linear), then the eager loss."""
    dense = eager_dense(divergence, hard_label)

    def loss(x):
        s = F.linear(x["hs"], x["ws"])
        with torch.no_grad():
            t = F.linear(x["ht"], x["wt"])
        return dense(s, t, x["labels"]) if hard_label else dense(s, t)
    return loss


def eager_sparse_kd(student, ids, logw, temperature: float = TEMPERATURE):
    """Sparse (top-k) forward KL with the teacher renormalised over its k ids, q over the full V."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, ids)
    log_p = F.log_softmax(logw, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature ** 2


def sparse_uses_full_vocab(divergence: str, beta: float = JSD_BETA) -> bool:
    """Whether the sparse loss compares with the student's full-vocabulary softmax (forward KL,
    and the generalized JSD at beta = 0, which is forward KL) rather than with the student
    renormalised over the target ids (every other divergence): distill_ops.sparse_kd_loss's
    tail="renorm" rule. The first reads every student logit; the second only those at the ids."""
    return divergence == "forward_kl" or (divergence == "generalized_jsd" and beta == 0.0)


def eager_sparse_support(student, ids, logw, divergence: str, temperature: float = TEMPERATURE,
                         beta: float = JSD_BETA, alpha: float = SKEW_ALPHA):
    """A sparse divergence on the target support as users write it: the student's logits gathered
    at the k ids and log-softmaxed there, the teacher's log-weights renormalised over them, then
    the dense forms (kl_div / logaddexp mixture; the JSDs in TRL's form on the gathered logits)."""
    s_k = student.float().gather(-1, ids) / temperature
    if divergence in ("jsd", "generalized_jsd"):
        return generalized_jsd_loss(s_k, logw.float(), beta=beta) * temperature ** 2
    log_q = F.log_softmax(s_k, dim=-1)
    log_p = F.log_softmax(logw.float(), dim=-1)
    fn = KL_LOGPROBS[divergence]
    out = fn(log_q, log_p, alpha) if divergence.startswith("skew") else fn(log_q, log_p)
    return out * temperature ** 2


def eager_sparse(divergence: str) -> Callable:
    """The eager sparse loss of one divergence: fn(student, ids, logw)."""
    if sparse_uses_full_vocab(divergence):
        return eager_sparse_kd

    def loss(student, ids, logw):
        return eager_sparse_support(student, ids, logw, divergence)
    return loss


def eager_topk(teacher, k: int):
    """Teacher top-k ids and their log-probabilities under the full-vocabulary softmax."""
    values, ids = F.log_softmax(teacher.float(), dim=-1).topk(k, dim=-1)
    return ids, values


def eager_sample(teacher, num_samples: int):
    """num_samples teacher ids per row drawn with replacement (torch.multinomial over the softmax),
    merged into unique ids (-1 pads the duplicates) weighted by count / num_samples: sampled
    targets as users write them."""
    probs = F.softmax(teacher.float(), dim=-1)
    ids = torch.multinomial(probs, num_samples, replacement=True).sort(-1).values
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    group = first.long().cumsum(-1) - 1
    ones = torch.ones(ids.shape, device=ids.device)
    counts = torch.zeros_like(ones).scatter_add_(1, group, ones).gather(1, group)
    logw = torch.where(first, (counts / num_samples).log(), -torch.inf)
    return torch.where(first, ids, -1), logw


# ----------------------------------------------------------------------------- providers

class Provider:
    name = "?"
    family = "baseline"  # baseline | distill_ops

    def check(self, case, device: torch.device) -> None:
        """Raise Unavailable / Missing when this provider cannot produce the row."""

    def make(self, case) -> Callable[[dict], object]:
        raise NotImplementedError


def _call_dense(fn, case):
    if case.hard_label:
        return lambda x: fn(x["student"], x["teacher"], x["labels"])
    return lambda x: fn(x["student"], x["teacher"])


class TorchEager(Provider):
    name = "torch-eager"

    def make(self, case):
        if case.suite == "dense":
            return _call_dense(eager_dense(case.divergence, case.hard_label), case)
        if case.suite == "linear":
            return eager_linear(case.divergence, case.hard_label)
        if case.suite == "sparse":
            fn = eager_sparse(case.divergence)
            return lambda x: fn(x["student"], x["ids"], x["logw"])
        teacher_fn = eager_sample if case.suite == "sample" else eager_topk
        return lambda x: teacher_fn(x["teacher"], case.k)


def fresh_compiler() -> Callable[[Callable], Callable]:
    """torch.compile(dynamic=False) after a dynamo reset (each row is compiled afresh, so its
    first call holds the compilation), with the recompile limit raised for the shapes a run
    tries (bench.trainer_step's --find-max)."""
    import torch._dynamo as dynamo

    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 64))
    dynamo.reset()
    return lambda fn: torch.compile(fn, dynamic=False)


class TorchCompile(Provider):
    """torch.compile of the eager functions above; a fresh compilation for every row."""

    name = "torch-compile"

    def make(self, case):
        compile_ = fresh_compiler()
        if case.suite == "dense":
            fn = compile_(eager_dense(case.divergence, case.hard_label))
            return _call_dense(fn, case)
        if case.suite == "linear":
            return compile_(eager_linear(case.divergence, case.hard_label))
        if case.suite == "sparse":
            fn = compile_(eager_sparse(case.divergence))
            return lambda x: fn(x["student"], x["ids"], x["logw"])
        k = case.k
        teacher_fn = eager_sample if case.suite == "sample" else eager_topk
        fn = compile_(lambda t: teacher_fn(t, k))
        return lambda x: fn(x["teacher"])


def package_version(dist: str) -> Optional[str]:
    """The installed version of a peer package (liger-kernel, trl), or None."""
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def import_or(module: str, what: str, error=None):
    """The module, or ``error`` (Unavailable by default) saying why ``what`` is not importable."""
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise (error or Unavailable)(f"{what} is not importable ({type(exc).__name__}: {exc})")


# The divergences Liger-Kernel computes: LigerKLDIVLoss, and LigerJSD(beta) (TRL's generalized
# JSD: beta = 1 reverse KL, in between JSD(beta)). No skew KL.
LIGER_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "generalized_jsd")


class Liger(Provider):
    """Liger-Kernel's losses on fp32 log-probabilities (how its KL / JSD modules are meant to be fed)."""

    name = "liger"

    def _module(self):
        return import_or("liger_kernel.transformers", "liger_kernel")

    def check(self, case, device):
        if device.type != "cuda":
            raise Unavailable("Liger-Kernel runs on GPUs only")
        if case.suite not in ("dense", "linear"):
            raise Unavailable(f"Liger-Kernel has no {case.suite} op")
        if case.suite == "linear" and case.hard_label:
            raise Unavailable("Liger's fused-linear JSD has no hard-label term")
        if case.divergence not in LIGER_DIVERGENCES:
            raise Unavailable(f"Liger-Kernel has no {case.divergence} op (its losses: KL-div, "
                              "and JSD with beta, which covers forward/reverse KL and the "
                              "generalized JSD; no skew KL)")
        self._module()

    def make(self, case):
        lk = self._module()
        tau = TEMPERATURE
        if case.suite == "linear":
            # LigerFusedLinearJSD: beta = 0 is forward KL, 0.5 our JSD (checked in the tests)
            fl = lk.LigerFusedLinearJSD(jsd_beta=0.0 if case.divergence == "forward_kl"
                                        else JSD_BETA, temperature=tau)
            return lambda x: fl(x["hs"], x["ws"], x["ht"], x["wt"], None) * tau ** 2
        if case.divergence == "forward_kl":
            kl = lk.LigerKLDIVLoss(reduction="batchmean", log_target=True)

            def soft(log_q, log_p):
                return kl(log_q, log_p) * tau ** 2
        else:
            # Liger's JSD: beta = 1 is the reverse KL, as in TRL; jsd and generalized_jsd at
            # JSD_BETA are the same function.
            jsd = lk.LigerJSD(beta=1.0 if case.divergence == "reverse_kl" else JSD_BETA)

            def soft(log_q, log_p):
                return jsd(log_q, log_p) * tau ** 2
        ce = None
        if case.hard_label:
            ce_cls = getattr(lk, "LigerCrossEntropyLoss", None)
            ce = ce_cls() if ce_cls is not None else torch.nn.CrossEntropyLoss()

        def loss(x):
            log_q = F.log_softmax(x["student"].float() / tau, dim=-1)
            log_p = F.log_softmax(x["teacher"].float() / tau, dim=-1)
            out = soft(log_q, log_p)
            if ce is not None:
                out = out + HARD_WEIGHT * ce(x["student"], x["labels"])
            return out

        return loss


class TrlChunked(Provider):
    """TRL's own fused-linear distillation loss (trl >= 1.16, DistillationTrainer's
    _chunked_divergence_loss: vocabulary tiles, recomputed in the backward; Triton on a GPU, torch
    tiles on the CPU). Generalized JSD with beta 0 = forward KL and beta = JSD_BETA = our JSD; no
    T^2 factor, so the provider multiplies it in."""

    name = "trl"

    def _fn(self):
        module = import_or("trl.trainer.distillation_trainer", "trl's DistillationTrainer")
        fn = getattr(module, "_chunked_divergence_loss", None)
        if fn is None:
            raise Unavailable("this trl has no _chunked_divergence_loss")
        return fn

    def check(self, case, device):
        if case.suite != "linear":
            raise Unavailable("TRL's fused kernel is the loss from hidden states and lm_heads")
        if case.hard_label or case.divergence not in ("forward_kl", "jsd"):
            raise Unavailable("TRL's fused kernel has no hard-label term and only the "
                              "generalized JSD")
        self._fn()

    def make(self, case):
        fn = self._fn()
        beta = 0.0 if case.divergence == "forward_kl" else JSD_BETA
        tau = TEMPERATURE

        def loss(x):
            mask = torch.ones(x["hs"].shape[:-1], dtype=torch.long, device=x["hs"].device)
            out, _, _ = fn(x["hs"], x["ht"], x["ws"], x["wt"], mask, beta, temperature=tau)
            return out * tau ** 2

        return loss


# torchtune's KD losses: the chunked forms its distillation recipes use by default.
TORCHTUNE_CHUNKS = 8
TORCHTUNE_CLASSES = {"forward_kl": "ForwardKLWithChunkedOutputLoss",
                     "reverse_kl": "ReverseKLWithChunkedOutputLoss"}


class _TorchtuneLoss(Provider):
    """A torchtune KD loss class (torchtune's own, or distill_ops' drop-in for it) on the dense
    suite, fed as torchtune's recipes feed it: lists of logit chunks along the tokens. torchtune's
    "forward KL" is the cross-entropy -sum p log q (no temperature, no hard-label term): the same
    gradient as forward KL, a value that carries the teacher's entropy."""

    def _classes(self):
        raise NotImplementedError

    def check(self, case, device):
        if case.suite != "dense":
            raise Unavailable(f"torchtune has no {case.suite} op")
        if case.hard_label or case.divergence not in TORCHTUNE_CLASSES:
            raise Unavailable("torchtune's KD losses are forward and reverse KL without a "
                              "hard-label term (its recipes add the CE loss on their own)")
        self._classes()

    def make(self, case):
        fn = getattr(self._classes(), TORCHTUNE_CLASSES[case.divergence])(
            num_output_chunks=TORCHTUNE_CHUNKS)

        def loss(x):
            s, t = x["student"].unsqueeze(0), x["teacher"].unsqueeze(0)   # (1, N, V): chunk N
            labels = torch.zeros(s.shape[:-1], dtype=torch.long, device=s.device)
            return fn(list(s.chunk(TORCHTUNE_CHUNKS, dim=1)),
                      list(t.chunk(TORCHTUNE_CHUNKS, dim=1)), labels)

        return loss


class Torchtune(_TorchtuneLoss):
    name = "torchtune"

    def _classes(self):
        return import_or("torchtune.modules.loss", "torchtune")


class DistillOpsTorchtune(_TorchtuneLoss):
    """distill_ops.integrations.torchtune's drop-ins (backend auto): what a torchtune user gets by
    changing the kd_loss component; the forward loss pays one more teacher read for its entropy."""

    name = "distill_ops:torchtune"
    family = "distill_ops"

    def _classes(self):
        return import_or("distill_ops.integrations.torchtune",
                         "distill_ops.integrations.torchtune", Missing)


class DistillOps(Provider):
    """distill_ops' public API with one backend forced (torch | triton | cpu | cuda)."""

    family = "distill_ops"

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"distill_ops:{backend}"

    def _package(self):
        return import_or("distill_ops", "distill_ops")

    # The public name, then where the function lives in case it is not re-exported yet.
    APIS = {"dense": ("kd_loss", "distill_ops.functional"),
            "sparse": ("sparse_kd_loss", "distill_ops.sparse"),
            "topk": ("teacher_topk", "distill_ops.targets.topk"),
            "sample": ("teacher_sample", "distill_ops.targets.sample"),
            "linear": ("fused_linear_kd_loss", "distill_ops.fused_linear")}

    def _api(self, suite: str) -> Callable:
        pkg = self._package()
        name, module = self.APIS[suite]
        fn = getattr(pkg, name, None)
        if fn is None:
            try:
                fn = getattr(importlib.import_module(module), name, None)
            except ImportError:
                fn = None
        if fn is None:
            raise Missing(f"distill_ops.{name} does not exist yet")
        return fn

    def check(self, case, device):
        self._api(case.suite)
        from distill_ops import backends

        resolve = backends.resolve
        if case.suite not in ("dense", "linear"):
            try:  # the sparse ops have their own (smaller) set of backends
                resolve = importlib.import_module("distill_ops.ops.sparse").resolve
            except (ImportError, AttributeError):
                pass
        try:
            resolve(self.backend, device)
        except Exception as exc:
            raise Unavailable(str(exc))

    def make(self, case):
        b = self.backend
        if case.suite == "dense":
            kd_loss = self._api("dense")
            div = case.divergence
            kw = dict(divergence=div, beta=JSD_BETA, alpha=SKEW_ALPHA, temperature=TEMPERATURE,
                      backend=b)
            if case.hard_label:
                return lambda x: kd_loss(x["student"], x["teacher"], labels=x["labels"],
                                         hard_weight=HARD_WEIGHT, **kw)
            return lambda x: kd_loss(x["student"], x["teacher"], **kw)
        if case.suite == "linear":
            fused_linear_kd_loss = self._api("linear")
            kw = dict(divergence=case.divergence, beta=JSD_BETA, temperature=TEMPERATURE,
                      backend=b)
            if case.hard_label:
                kw["hard_weight"] = HARD_WEIGHT
            return lambda x: fused_linear_kd_loss(x["hs"], x["ws"], x["ht"], x["wt"],
                                                  labels=x.get("labels"), **kw)
        if case.suite == "sparse":
            sparse = self._api("sparse")
            kw = dict(divergence=case.divergence, beta=JSD_BETA, alpha=SKEW_ALPHA,
                      temperature=TEMPERATURE, backend=b)
            return lambda x: sparse(x["student"], x["ids"], x["logw"], **kw)
        teacher_fn = self._api(case.suite)
        k = case.k
        return lambda x: teacher_fn(x["teacher"], k, backend=b)


class DistillOpsForced(DistillOps):
    """distill_ops' CUDA backend with one of its kernels chosen through the environment variable
    the extension reads at every call (set for this provider's call only, then restored): the
    variants that `auto` does not pick yet, timed beside it."""

    def __init__(self, variant: str, env: str, value: str, suite: str, why: str):
        super().__init__("cuda")
        self.name = f"distill_ops:cuda-{variant}"
        self.ENV, self.VALUE, self.SUITE, self.WHY = env, value, suite, why

    def check(self, case, device):
        if case.suite != self.SUITE:
            raise Unavailable(self.WHY)
        super().check(case, device)

    def make(self, case):
        fn = super().make(case)

        def call(x):
            old = os.environ.get(self.ENV)
            os.environ[self.ENV] = self.VALUE
            try:
                return fn(x)
            finally:
                if old is None:
                    del os.environ[self.ENV]
                else:
                    os.environ[self.ENV] = old

        return call


def DistillOpsResident() -> DistillOpsForced:
    """The one-read resident (thread-block cluster) dense kernel, required
    (DISTILL_OPS_CUDA_RESIDENT=require, csrc/cuda/dense_resident.cuh): opt-in until measured; where
    it does not apply the row fails with the kernel's reason, not another kernel's time."""
    return DistillOpsForced("resident", "DISTILL_OPS_CUDA_RESIDENT", "require", "dense",
                            "the resident kernel is a dense-loss kernel")


def DistillOpsRadix() -> DistillOpsForced:
    """The radix-select top-k kernel (DISTILL_OPS_CUDA_TOPK=radix, csrc/cuda/teacher_cuda.cu),
    which reads each row 3-5 times, beside the one-read kernel that distill_ops:cuda runs."""
    return DistillOpsForced("radix", "DISTILL_OPS_CUDA_TOPK", "radix", "topk",
                            "the radix kernel is a top-k kernel")


def get(name: str) -> Provider:
    if name == "torch-eager":
        return TorchEager()
    if name == "torch-compile":
        return TorchCompile()
    if name == "liger":
        return Liger()
    if name == "trl":
        return TrlChunked()
    if name == "torchtune":
        return Torchtune()
    if name == "distill_ops:cuda-resident":
        return DistillOpsResident()
    if name == "distill_ops:cuda-radix":
        return DistillOpsRadix()
    if name == "distill_ops:torchtune":
        return DistillOpsTorchtune()
    if name.startswith("distill_ops:"):
        return DistillOps(name.split(":", 1)[1])
    raise SystemExit(f"unknown provider {name!r}: torch-eager, torch-compile, liger, trl, "
                     "torchtune, distill_ops:<torch|triton|cpu|cuda>, distill_ops:cuda-resident, "
                     "distill_ops:cuda-radix, "
                     "distill_ops:torchtune")
