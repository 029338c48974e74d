"""The counter-based random numbers of sampled targets, defined once.

Every random number is a pure function of (seed, row, sample, vocabulary index), computed with 32-bit
unsigned integer arithmetic (wrap-around multiply, xor, logical shift) that torch (on int64 tensors,
masked to 32 bits), Triton (on uint32) and plain Python compute bit for bit alike. So the reference
and the Triton kernel draw identical ids, whatever the block sizes or chunking, and a row's draws do
not depend on which other rows are in the batch (only on its index ``row``).

    fmix32(h)      the MurmurHash3 32-bit finalizer (a bijection of [0, 2^32) with full avalanche)
    seed_key       = fmix32(seed_lo ^ fmix32(seed_hi ^ 0x5BD1E995))           (host, once per call)
    row_key(r)     = fmix32(seed_key ^ fmix32((r + 0x9E3779B9) mod 2^32))
    sample_key(s)  = fmix32(row_key ^ fmix32((s + 0x632BE5AB) mod 2^32))
    vocab_key(j)   = fmix32(j ^ 0x2545F491)
    bits(s, j)     = fmix32(sample_key(s) ^ vocab_key(j))
    u(s, j)        = ((bits >> 9) + 0.5) / 2^23       in (0, 1), exact in float32
    gumbel(s, j)   = -noise_log(-noise_log(u))        in float32, then cast to the compute dtype

noise_log is a float32 natural log defined by its operations (below): only integer bit operations
and float32 multiplies, adds and subtracts, each rounded on its own, so every backend (torch on the CPU
or a GPU, the C++ and CUDA kernels, Triton compiled without FMA contraction or interpreted) computes
the same bits. Library logs differ by an ulp on about one input in ten (torch's vectorised log and
glibc's logf do), which would decide a race whose two best scores are that close. It is within 0.82
ulp of the true log on every input the noise feeds it, and gumbel is nondecreasing in the rank
bits >> 9, with values in [-2.8116, 16.6356] (tests/test_sparse_sample.py checks all 2^23 ranks).

Sample s of row r is argmax_j (x_j / (temperature * proposal_temperature) + gumbel(s, j)), the lowest
j on ties: a draw from softmax(x / (temperature * proposal_temperature)) (the Gumbel-max trick).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
M1 = 0x7FEB352D
M2 = 0x846CA68B
SEED_SALT = 0x5BD1E995
ROW_SALT = 0x9E3779B9
SAMPLE_SALT = 0x632BE5AB
VOCAB_SALT = 0x2545F491
U_SCALE = 1.0 / (1 << 23)


def fmix32_int(h: int) -> int:
    """fmix32 on a Python int."""
    h &= MASK32
    h ^= h >> 16
    h = (h * M1) & MASK32
    h ^= h >> 15
    h = (h * M2) & MASK32
    h ^= h >> 16
    return h


def seed_key(seed: int) -> int:
    """The 32-bit key of a seed (any int; taken modulo 2^64)."""
    seed &= (1 << 64) - 1
    return fmix32_int((seed & MASK32) ^ fmix32_int((seed >> 32) ^ SEED_SALT))


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """fmix32 on an int64 tensor of values in [0, 2^32) (the products wrap; the low 32 bits are kept)."""
    h = h ^ (h >> 16)
    h = (h * M1) & MASK32
    h = h ^ (h >> 15)
    h = (h * M2) & MASK32
    return h ^ (h >> 16)


def row_keys(key: int, rows: torch.Tensor) -> torch.Tensor:
    return fmix32(key ^ fmix32((rows + ROW_SALT) & MASK32))


def sample_keys(row_key: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """row_key (...,) and samples (S,) -> (..., S)."""
    return fmix32(row_key.unsqueeze(-1) ^ fmix32((samples + SAMPLE_SALT) & MASK32))


def vocab_keys(cols: torch.Tensor) -> torch.Tensor:
    return fmix32(cols ^ VOCAB_SALT)


# noise_log's constants, exact float32 values (hex, so no decimal parsing can round them apart):
# a degree-8 polynomial for (log(1 + f) - f + f^2 / 2) / f^3 on f in [sqrt(1/2) - 1, sqrt(2) - 1]
# (the classic Cephes logf coefficients rounded to float32) and ln 2 = LN2_HI + LN2_LO.
LOG_POLY = tuple(float.fromhex(h) for h in (
    "0x1.204376p-4", "-0x1.d7a370p-4", "0x1.de4a34p-4", "-0x1.fcba9ep-4", "0x1.23d37ep-3",
    "-0x1.555ca0p-3", "0x1.999d58p-3", "-0x1.fffff8p-3", "0x1.555554p-2"))
LN2_HI = float.fromhex("0x1.63p-1")
LN2_LO = float.fromhex("-0x1.bd0106p-13")
SQRT_HALF = float.fromhex("0x1.6a09e6p-1")
# Every gumbel value is below this (the largest, at u = 1 - 2^-24, is 16.63553); rng.h kGumbelMax.
GUMBEL_MAX = 16.7


def noise_log(x: torch.Tensor) -> torch.Tensor:
    """The natural log of positive normal float32 values, in float32, by fixed operations (every
    product and sum rounded on its own): x = m 2^e with m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact),
    log x = f - f^2/2 + f^3 P(f) + e ln 2, summed in this order. csrc/include/distill_ops/rng.h and
    the Triton kernel spell out the same operations."""
    bits = x.view(torch.int32)
    e = ((bits >> 23) - 126).to(torch.float32)
    m = ((bits & 0x7FFFFF) | 0x3F000000).view(torch.float32)  # in [1/2, 1)
    small = m < SQRT_HALF
    e = torch.where(small, e - 1.0, e)
    f = torch.where(small, (m + m) - 1.0, m - 1.0)
    z = f * f
    p = torch.full_like(f, LOG_POLY[0])
    for c in LOG_POLY[1:]:
        p = p * f + c
    y = (p * f) * z
    y = y + e * LN2_LO
    y = y - z * 0.5
    r = f + y
    return r + e * LN2_HI


def uniform_rank(sample_key: torch.Tensor, vocab_key: torch.Tensor) -> torch.Tensor:
    """The rank bits >> 9 in [0, 2^23) of every (sample, column) pair: sample_key (..., S, 1),
    vocab_key (B,) -> (..., S, B). u, and so the noise, is a function of it alone."""
    return fmix32(sample_key ^ vocab_key) >> 9


def uniform_of_rank(k: torch.Tensor) -> torch.Tensor:
    """u = (k + 0.5) / 2^23, float32 (exact)."""
    return (k.to(torch.float32) + 0.5) * U_SCALE


def gumbel_of(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """-noise_log(-noise_log(u)) in float32, cast to ``dtype``."""
    return (-noise_log(-noise_log(u))).to(dtype)


_TABLES: dict[torch.device, torch.Tensor] = {}


def gumbel_table(device: torch.device | str) -> torch.Tensor:
    """gumbel_of for every rank k = bits >> 9 (float32, 2^23 values, 32 MB), made once per device:
    the noise depends on the rank alone, and a lookup costs one gather where noise_log costs about
    thirty elementwise operations."""
    device = torch.device(device)
    table = _TABLES.get(device)
    if table is None:
        table = gumbel_of(uniform_of_rank(torch.arange(1 << 23, device=device)), torch.float32)
        _TABLES[device] = table
    return table


def gumbel(sample_key: torch.Tensor, vocab_key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gumbel noise for every (sample, column) pair: sample_key (..., S, 1), vocab_key (B,) ->
    (..., S, B) in ``dtype`` (gumbel_of(u), looked up by rank in gumbel_table)."""
    k = uniform_rank(sample_key, vocab_key)
    return gumbel_table(k.device)[k].to(dtype)
