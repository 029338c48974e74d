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
    gumbel(s, j)   = -log(-log(u))

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


def gumbel(sample_key: torch.Tensor, vocab_key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gumbel noise for every (sample, column) pair: sample_key (..., S, 1), vocab_key (B,) ->
    (..., S, B) in ``dtype``."""
    bits = fmix32(sample_key ^ vocab_key)
    u = ((bits >> 9).to(torch.float32) + 0.5) * U_SCALE
    return -torch.log(-torch.log(u.to(dtype)))
