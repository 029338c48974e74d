"""Sweeps, presets and the plan (the ordered list of cases a run measures)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

SUITES = ("dense", "sparse", "topk", "sample", "linear")
# Suites that time the teacher side (a forward only, no gradient): top-k and sampled targets.
TEACHER_SUITES = ("topk", "sample")
MODES = ("fwd", "bwd", "fwdbwd")
# Dense cases: a divergence, optionally with the hard-label (cross-entropy) term, written "+ce".
# Every divergence of distill_ops (distill_ops.DIVERGENCES; tests/test_bench.py checks the two
# agree). Written out here so that the plan does not need distill_ops importable: a missing
# distill_ops is a row of the run, not a failure to plan it.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
               "generalized_jsd")
# What the full GPU sweep runs when no --divergence is given (unchanged: the others on request).
DENSE_CASES = ("forward_kl", "reverse_kl", "jsd", "forward_kl+ce")
# The divergences sparse_kd_loss takes (the same set; no hard-label cases in the sparse suite).
# forward_kl compares with the student's full-vocabulary softmax, the others on the target
# support (distill_ops.sparse_kd_loss, tail="renorm"); forward_kl runs when none is asked.
SPARSE_DIVERGENCES = DIVERGENCES
SPARSE_DEFAULT = ("forward_kl",)

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# The full sweep (GPU). N is shrunk per row where a provider would not fit in free memory.
FULL_V = (32000, 128256, 151936, 262144)
FULL_N = (1024, 4096, 8192, 16384)
FULL_DTYPES = ("bf16", "fp16", "fp32")
DEFAULT_K = (64,)  # top-k size, and the number of samples of the sample suite
CPU_SAMPLE_N = (32,)

# Providers per suite and device (names as in providers.py), in the order rows are printed.
GPU_DENSE = ("torch-eager", "torch-compile", "liger", "distill_ops:triton", "distill_ops:cuda",
             "distill_ops:cuda-resident")
CPU_DENSE = ("torch-eager", "torch-compile", "distill_ops:cpu", "distill_ops:torch")
GPU_SPARSE = ("torch-eager", "torch-compile", "distill_ops:triton", "distill_ops:cuda")
# top-k: also the radix kernel beside the one-read kernel that distill_ops:cuda runs
GPU_TOPK = GPU_SPARSE + ("distill_ops:cuda-radix",)
CPU_SPARSE = ("torch-eager", "torch-compile", "distill_ops:cpu", "distill_ops:torch")
DISTILL_GPU = ("distill_ops:triton", "distill_ops:cuda")
DISTILL_GPU_DENSE = DISTILL_GPU + ("distill_ops:cuda-resident",)
# The fused-linear suite: the loss from hidden states and lm_heads (no logits tensor).
GPU_LINEAR = ("torch-eager", "torch-compile", "liger", "trl", "distill_ops:triton",
              "distill_ops:cuda")
CPU_LINEAR = ("torch-eager", "trl", "distill_ops:cpu")
LINEAR_DIVERGENCES = ("forward_kl", "jsd")
DEFAULT_H = {"cuda": 2048, "cpu": 256}
CPU_LINEAR_V = (32000,)   # student hidden size; the teacher's is 1.5x (inputs.py)

# --quick on a GPU: the key rows first, then optional ones while the time budget lasts.
QUICK_GPU_BUDGET_S = 240.0
# --quick sparse/topk/sample rows (optional): no torch.compile there, its compilations cost the most time.
QUICK_SPARSE = ("torch-eager", "distill_ops:triton", "distill_ops:cuda")
QUICK_TOPK = QUICK_SPARSE + ("distill_ops:cuda-radix",)


@dataclasses.dataclass(frozen=True)
class Case:
    suite: str            # dense | sparse | topk | sample
    divergence: str     # dense/sparse: DIVERGENCES; linear: LINEAR_DIVERGENCES; topk/sample: suite
    hard_label: bool      # dense only: add the hard-label cross-entropy term
    dtype: str            # bf16 | fp16 | fp32
    n: int
    v: int
    mode: str             # fwd | bwd | fwdbwd
    k: Optional[int] = None
    h: Optional[int] = None             # linear only: the student's hidden size
    providers: Optional[tuple] = None   # None: the suite's default list for the device
    optional: bool = False              # skipped (and recorded so) once the time budget is spent

    @property
    def label(self) -> str:
        div = self.divergence + ("+ce" if self.hard_label else "")
        k = f" k={self.k}" if self.k is not None else ""
        h = f" H={self.h}" if self.h is not None else ""
        return f"{self.suite} {div} {self.dtype} N={self.n} V={self.v}{k}{h} {self.mode}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def split_list(values: Optional[Sequence[str]], cast=str) -> Optional[list]:
    """Accept ``--V 32000 128256`` and ``--V 32000,128256`` alike."""
    if not values:
        return None
    out = []
    for value in values:
        out.extend(cast(part) for part in str(value).split(",") if part.strip())
    return out


def default_providers(suite: str, device: str) -> tuple:
    gpu = device == "cuda"
    if suite == "dense":
        return GPU_DENSE if gpu else CPU_DENSE
    if suite == "linear":
        return GPU_LINEAR if gpu else CPU_LINEAR
    if suite == "topk":
        return GPU_TOPK if gpu else CPU_SPARSE
    return GPU_SPARSE if gpu else CPU_SPARSE


def _dense_cases(divs, dtypes, ns, vs, modes, providers=None, optional=False, *,
                 suite="dense", h=None):
    """Cases over logits (``dense``) or over hidden states and lm_heads (``linear``, hidden size h)."""
    allowed = LINEAR_DIVERGENCES if suite == "linear" else DIVERGENCES
    cases = []
    for div in divs:
        base, hard = (div[:-3], True) if div.endswith("+ce") else (div, False)
        if base not in allowed:
            raise SystemExit(f"{suite} suite: unknown divergence {div!r}; choose from {allowed} "
                             "(or +ce)")
        for dtype in dtypes:
            for v in vs:
                for n in ns:
                    for mode in modes:
                        cases.append(Case(suite, base, hard, dtype, n, v, mode, h=h,
                                          providers=providers, optional=optional))
    return cases


def _sparse_cases(suite, dtypes, ns, vs, modes, ks, providers=None, optional=False, *,
                  divs=None):
    """Sparse-target cases (``divs``: the sparse divergences, default forward KL) and the
    teacher-side suites (top-k, sampling: no divergence, a forward only)."""
    teacher = suite in TEACHER_SUITES
    if teacher:
        divs = (suite,)
    else:
        divs = tuple(divs or SPARSE_DEFAULT)
        for div in divs:
            if div not in SPARSE_DIVERGENCES:
                extra = (" (the sparse suite has no hard-label case)" if div.endswith("+ce")
                         else "")
                raise SystemExit(f"sparse suite: unknown divergence {div!r}; choose from "
                                 f"{SPARSE_DIVERGENCES}{extra}")
    cases = []
    for div in divs:
        for dtype in dtypes:
            for v in vs:
                for n in ns:
                    for k in ks:
                        for mode in (("fwd",) if teacher else modes):
                            cases.append(Case(suite, div, False, dtype, n, v, mode, k=k,
                                              providers=providers, optional=optional))
    return cases


def build_plan(suite: str, device: str, quick: bool, *, V=None, N=None, dtype=None, mode=None,
               divergence=None, k=None, H=None) -> list:
    """The ordered cases of a run. Explicit lists (--V, --N, ...) override the preset's."""
    suites = SUITES if suite == "all" else (suite,)
    gpu = device == "cuda"
    explicit = any(x is not None for x in (V, N, dtype, mode, divergence, k))
    h = H or DEFAULT_H[device]
    cases: list = []
    if quick and gpu and not explicit:
        # Key rows: every provider at the headline shape, and a short-batch row (N=256) where the
        # distill_ops kernels may split rows across programs.
        if "dense" in suites:
            cases += _dense_cases(("forward_kl", "jsd"), ("bf16",), (8192, 256), (128256,),
                                  ("fwdbwd",))
        # If time allows: the large vocabularies, distill_ops kernels only.
        if "dense" in suites:
            cases += _dense_cases(("forward_kl", "jsd"), ("bf16",), (4096,), (151936, 262144),
                                  ("fwdbwd",), providers=DISTILL_GPU_DENSE, optional=True)
        for s in ("sparse",) + TEACHER_SUITES:
            if s in suites:
                cases += _sparse_cases(s, ("bf16",), (8192,), (128256,), ("fwdbwd",), DEFAULT_K,
                                       providers=QUICK_TOPK if s == "topk" else QUICK_SPARSE,
                                       optional=True)
        if "linear" in suites:
            cases += _dense_cases(("forward_kl",), ("bf16",), (8192,), (128256,), ("fwdbwd",),
                                  optional=True, suite="linear", h=h)
        return cases
    if gpu:
        d_v, d_n, d_dtypes, d_modes = FULL_V, FULL_N, FULL_DTYPES, ("fwdbwd",)
        d_divs = ("forward_kl", "jsd") if quick else DENSE_CASES
    else:
        # CPU: fp32, N=512, V=128256, forward KL, forward+backward.
        d_v, d_n, d_dtypes, d_modes, d_divs = (128256,), (512,), ("fp32",), ("fwdbwd",), ("forward_kl",)
    vs, ns = V or d_v, N or d_n
    dtypes, modes = dtype or d_dtypes, mode or d_modes
    for name in dtypes:
        if name not in DTYPES:
            raise SystemExit(f"unknown dtype {name!r}; choose from bf16, fp16, fp32")
    dtypes = [DTYPE_NAMES[DTYPES[name]] for name in dtypes]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {MODES}")
    if "dense" in suites:
        cases += _dense_cases(divergence or d_divs, dtypes, ns, vs, modes)
    s_divs = divergence
    if suite == "all" and divergence:
        # the other suites' divergences that the sparse suite has (no "+ce"); none: its default
        s_divs = [d for d in divergence if d in SPARSE_DIVERGENCES] or None
    for s in ("sparse",) + TEACHER_SUITES:
        if s in suites:
            # CPU sampling: S x V Gumbel draws per row (two logs each), ~100x a top-k: fewer rows.
            s_ns = ns if (N or gpu or s != "sample") else CPU_SAMPLE_N
            cases += _sparse_cases(s, dtypes, s_ns, vs, modes, k or DEFAULT_K, divs=s_divs)
    if "linear" in suites:
        # CPU: the GEMMs (2 N V (H_s + H_t) flops forward) dominate; a smaller vocabulary.
        l_vs = vs if (V or gpu) else CPU_LINEAR_V
        l_divs = divergence or (LINEAR_DIVERGENCES if gpu else ("forward_kl",))
        if suite == "all":   # the other suites' divergences that the linear suite has
            l_divs = [d for d in l_divs if d.split("+")[0] in LINEAR_DIVERGENCES]
        cases += _dense_cases(l_divs, dtypes, ns, l_vs, modes, suite="linear", h=h)
    return cases
