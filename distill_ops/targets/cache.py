"""The offline cache of sparse teacher targets: sharded safetensors files plus a JSON manifest.

Layout of a cache directory::

    manifest.json              what the cache holds (below); rewritten atomically after each shard
    shard-00000.safetensors    input_ids int32 (T,), ids int32 (T, k), logprobs fp16/bf16/fp32
    shard-00001.safetensors    (T, k), tail_logmass float32 (T,), offsets int64 (S + 1,): sequence
    ...                        s of the shard is tokens offsets[s]:offsets[s+1]

Targets are aligned with the input tokens: row t holds the teacher's distribution at position t
(its prediction of token t + 1), exactly as the teacher's logits are laid out. Log-probabilities
are stored rounded toward -inf in the storage dtype, so a row never holds more mass than the
teacher gave it (rounded to nearest, bfloat16 could exceed 1 by more than sparse_kd_loss allows).

Manifest fields: format_version, teacher (the CLI records the model directory's name and its
model_fingerprint: "final@3fa2..."), vocab_size, tokenizer_hash (the CLI records
vocab_fingerprint: "vocab:9c1e..."; older caches the files' tokenizer_hash), mode ("topk" |
"sample"), k (slots per token: k of top-k, or the sample count), temperature, dtype (of logprobs),
shard_tokens, extra (e.g. proposal_temperature and seed of sampled targets), num_sequences,
num_tokens, complete, and shards: a list of {file, sequences, tokens, bytes, sha256}.

Crash safety: a shard is written to a temporary file, flushed and renamed into place, and only then
listed in the manifest (itself replaced atomically). A shard being written when the process dies is
never listed; re-opening the cache with TargetCacheWriter continues after the last listed shard
(write_teacher_cache skips the sequences already cached). Shard files in a directory without a
manifest are refused, never deleted (nothing says what they hold). The reader verifies every
listed shard's size and sha256 on open: a truncated or corrupted shard is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch

from .. import _validate as check
from .types import SparseTargets

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODES = ("topk", "sample")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_SHARD_TOKENS = 1 << 18
# The fields every manifest has.
MANIFEST_KEYS = ("format_version", "teacher", "vocab_size", "tokenizer_hash", "mode", "k",
                 "temperature", "dtype", "shard_tokens", "extra", "num_sequences", "num_tokens",
                 "complete", "shards")
SHARD_KEYS = ("file", "sequences", "tokens", "bytes", "sha256")
# safetensors' names of the storage dtypes.
SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# The fields a re-opened cache must agree on.
IDENTITY = ("vocab_size", "mode", "k", "temperature", "dtype", "teacher", "tokenizer_hash", "extra")
# The names the writer gives its files: shards, and the temporary files _atomic_write renames
# into place (a shard's or the manifest's). Nothing else in a cache directory is the writer's.
SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")
TEMP_NAME = re.compile(r"(shard-\d{5,}\.safetensors|" + re.escape(MANIFEST) + r")\.tmp")
# sparse_kd_loss's argument names in the messages of its target checks, and the names they have
# in TargetCacheWriter.add.
_ADD_NAMES = {"target_ids": "targets.ids", "target_logprobs": "targets.logprobs",
              "tail_logmass": "targets.tail_logmass"}


class CacheError(ValueError):
    """A cache that cannot be used as asked: corrupted, of another format, or of another teacher."""


def _dtype_name(dtype: Union[str, torch.dtype]) -> str:
    if isinstance(dtype, torch.dtype):
        for name, dt in DTYPES.items():
            if dt == dtype:
                return name
    elif dtype in DTYPES:
        return dtype
    raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass


def read_manifest(path: Union[str, os.PathLike]) -> Optional[dict]:
    """The manifest of the cache at ``path``, or None if there is none yet."""
    f = Path(path) / MANIFEST
    if not f.exists():
        return None
    try:
        manifest = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(f"{f} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise CacheError(f"{f} is not a manifest (a JSON object), got a {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(f"{f} has format_version {version!r}; this distill-ops reads version "
                         f"{FORMAT_VERSION}")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise CacheError(f"{f} lacks {', '.join(missing)}")
    return manifest


def tokenizer_hash(model_dir: Union[str, os.PathLike]) -> str:
    """sha256 over the tokenizer files of a transformers model directory ("" if it has none): the
    fingerprint caches recorded before vocab_fingerprint, still accepted (tokenizer_hashes)."""
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
             "tokenizer_config.json", "special_tokens_map.json")
    h = hashlib.sha256()
    found = False
    for name in names:
        f = Path(model_dir) / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest() if found else ""


def vocab_fingerprint(tokenizer) -> str:
    """What a cache's token ids mean: "vocab:" + sha256 over the tokenizer's (token, id) pairs.
    A cache stores the token ids themselves, so one vocabulary is all that must match: a tokenizer
    re-saved (other files, another transformers version) or given a chat template keeps it."""
    items = sorted(tokenizer.get_vocab().items())
    return "vocab:" + hashlib.sha256(json.dumps(items).encode()).hexdigest()


def tokenizer_hashes(model_dir: Union[str, os.PathLike]) -> tuple:
    """The tokenizer fingerprints a cache made with ``model_dir``'s tokenizer may carry, the one to
    record first: its vocabulary's (vocab_fingerprint; when transformers loads it) and its files'
    (tokenizer_hash, what older caches recorded). Empty when the directory has no tokenizer."""
    files = tokenizer_hash(model_dir)
    if not files:
        return ()
    try:
        from transformers import AutoTokenizer

        vocab = vocab_fingerprint(AutoTokenizer.from_pretrained(str(model_dir)))
    except Exception as exc:   # unloadable: the files are all there is to compare
        warnings.warn(f"the tokenizer in {model_dir} could not be loaded ({type(exc).__name__}: "
                      f"{exc}); the target cache compares its files instead", stacklevel=2)
        return (files,)
    return (vocab, files)


def tokenizer_hash_to_record(hashes: tuple, existing: Optional[dict] = None) -> str:
    """The fingerprint a writer records of a tokenizer whose tokenizer_hashes are ``hashes``: the
    one an ``existing`` manifest (a cache being resumed) already holds when it is among them (the
    writer refuses a cache whose identity changes: an older cache holds the files' hash), else
    the first ("" without a tokenizer)."""
    held = (existing or {}).get("tokenizer_hash")
    return held if held in hashes else (hashes or ("",))[0]


def _check_identity(path: Path, existing: dict, wanted: dict) -> None:
    """Raise unless the cache's manifest ``existing`` was written with the settings ``wanted``
    (its IDENTITY fields): appending other targets would mix them silently."""
    for key in IDENTITY:
        if existing.get(key) != wanted[key]:
            raise CacheError(f"the cache at {path} was written with {key}={existing.get(key)!r}, "
                             f"not {wanted[key]!r}; write to another directory or remove it")


def check_tail_mode(manifest: dict, tail: str, path: Union[str, os.PathLike]) -> None:
    """Raise unless sparse_kd_loss's ``tail`` suits the cache's targets: sampled ones (importance
    weights that stand for the whole distribution, tail_logmass -inf) need tail="renorm". With
    "tail" the loss holds the student to no mass outside the drawn ids: an infinite reverse KL,
    then NaN weights, with no error."""
    if manifest.get("mode") == "sample" and tail != "renorm":
        raise CacheError(f"the cache at {path} holds sampled targets: they need tail='renorm', "
                         f"not tail={tail!r} (their weights stand for the whole distribution, "
                         "with no tail mass)")


def warn_other_temperature(manifest: dict, temperature: float, what: str, setting: str) -> None:
    """Warn when a loss's ``temperature`` is not the one the cache's targets were made at: the
    targets stay at theirs, only the student side takes the other (rarely what was meant). The
    message reads "<what>'s targets were made at temperature T, but <setting>=<temperature>"."""
    made_at = manifest.get("temperature")
    if made_at is not None and abs(float(made_at) - float(temperature)) > 1e-9:
        warnings.warn(f"{what}'s targets were made at temperature {float(made_at)}, but "
                      f"{setting}={temperature} (the student side's; the targets stay at theirs)",
                      stacklevel=3)


def model_fingerprint(model_dir: Union[str, os.PathLike], dtype: str = "auto") -> str:
    """16 hex digits of sha256 over a transformers model directory's config.json, each weight
    file's name, size and first MiB (a safetensors file's header, then the start of its data), and
    ``dtype``, the dtype it is loaded in. It tells apart two teachers whose directories share a
    name (runs/a/final, runs/b/final), which would otherwise go into one cache unnoticed, without
    reading the whole model."""
    h = hashlib.sha256()
    d = Path(model_dir)
    for f in sorted(d.iterdir()) if d.is_dir() else ():
        weights = f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf")
        if f.is_file() and (f.name == "config.json" or weights or f.name.endswith(".index.json")):
            with open(f, "rb") as fh:
                head = fh.read(1 << 20) if weights else fh.read()
            h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0" + head)
    h.update(b"dtype\0" + str(dtype).encode())
    return h.hexdigest()[:16]


class TargetCacheWriter:
    """Writes a target cache; re-opening an existing one continues after its last complete shard.

    Example::

        with TargetCacheWriter("cache/", vocab_size=V, mode="topk", k=32, temperature=1.0,
                               dtype="float16") as w:
            for input_ids in batches:                        # (B, L) token ids
                w.add(input_ids, teacher_topk(teacher(input_ids).logits, 32))
    """

    def __init__(self, path: Union[str, os.PathLike], *, vocab_size: int, mode: str, k: int,
                 temperature: float, dtype: Union[str, torch.dtype] = "float16", teacher: str = "",
                 tokenizer_hash: str = "", shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 extra: Optional[dict] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, val in (("vocab_size", vocab_size), ("k", k), ("shard_tokens", shard_tokens)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if mode == "topk" and k > vocab_size:
            raise ValueError(f"k = {k} is more than vocab_size = {vocab_size}: top-k targets hold "
                             "k distinct ids of the vocabulary")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dtype = DTYPES[_dtype_name(dtype)]
        wanted = dict(vocab_size=vocab_size, mode=mode, k=k, temperature=float(temperature),
                      dtype=_dtype_name(dtype), teacher=teacher, tokenizer_hash=tokenizer_hash,
                      extra=dict(extra or {}))
        existing = read_manifest(self.path)
        if existing is not None:
            _check_identity(self.path, existing, wanted)
            self.manifest = existing
            self.manifest["shard_tokens"] = shard_tokens
            self.manifest["complete"] = False
        else:
            self.manifest = dict(format_version=FORMAT_VERSION, **wanted, shard_tokens=shard_tokens,
                                 num_sequences=0, num_tokens=0, complete=False, shards=[])
        self._clean_strays(manifest_found=existing is not None)
        self._buf: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buf_tokens = 0
        self._closed = False

    # -- state

    @property
    def num_sequences(self) -> int:
        """Sequences committed to listed shards (what a resumed run may skip)."""
        return int(self.manifest["num_sequences"])

    @property
    def pending_sequences(self) -> int:
        """Sequences buffered by add() but not yet in a written shard (lost if the process dies)."""
        return len(self._buf)

    def _clean_strays(self, manifest_found: bool) -> None:
        """Remove the writer's own debris of an interrupted write: its temporary files and, when a
        manifest exists, shards it does not list (their sequences are not counted as done, so a
        resumed run writes them again, under the same names).

        Shard files with no manifest at all are refused, never deleted: they may be a cache whose
        manifest was lost, which only the user can judge. (A run killed between its first shard
        and its first manifest also leaves this state.) Files of other names are left alone."""
        names = sorted(f.name for f in self.path.iterdir())
        shards = [n for n in names if SHARD_NAME.fullmatch(n)]
        if shards and not manifest_found:
            shown = ", ".join(shards[:3]) + (", ..." if len(shards) > 3 else "")
            raise CacheError(
                f"{self.path} holds {len(shards)} shard file{'s' * (len(shards) != 1)} ({shown}) "
                f"but no {MANIFEST}, so nothing says what they contain; they are left as they "
                "are. Write the cache to a new directory, or remove the shard files yourself if "
                f"they are not wanted (e.g. the first shard of a run interrupted before it wrote "
                f"{MANIFEST})")
        listed = {s["file"] for s in self.manifest["shards"]}
        for name in names:
            if TEMP_NAME.fullmatch(name) or (SHARD_NAME.fullmatch(name) and name not in listed):
                (self.path / name).unlink()

    # -- writing

    def add(self, input_ids: torch.Tensor, targets: SparseTargets,
            lengths: Optional[Union[torch.Tensor, Iterable[int]]] = None) -> None:
        """Buffer sequences: ``input_ids`` (L,) or (B, L); ``targets`` with ids/logprobs (..., L, k)
        and tail_logmass (..., L); ``lengths`` (B,) keeps the first lengths[b] tokens of row b
        (right padding). Full shards are written as the buffer fills."""
        if self._closed:
            raise RuntimeError("add() on a closed TargetCacheWriter")
        if not isinstance(targets, SparseTargets):
            targets = SparseTargets(*targets)
        ids_in = torch.as_tensor(input_ids)
        if ids_in.dim() == 1:
            ids_in = ids_in.unsqueeze(0)
            targets = SparseTargets(targets.ids.unsqueeze(0), targets.logprobs.unsqueeze(0),
                                    targets.tail_logmass.unsqueeze(0))
        b, seq = ids_in.shape
        k = self.manifest["k"]
        if targets.ids.dim() and targets.ids.shape[-1] != k:
            raise ValueError(f"targets have k = {targets.ids.shape[-1]} slots, but this cache "
                             f"holds k = {k} (the writer's k)")
        if targets.ids.shape != (b, seq, k) or targets.logprobs.shape != (b, seq, k):
            raise ValueError(f"targets must have ids and logprobs of shape {(b, seq, k)} (input_ids "
                             f"{tuple(ids_in.shape)}, k={k}), got {tuple(targets.ids.shape)} and "
                             f"{tuple(targets.logprobs.shape)}")
        if targets.tail_logmass.shape != (b, seq):
            raise ValueError(f"targets.tail_logmass must have shape {(b, seq)}, got "
                             f"{tuple(targets.tail_logmass.shape)}")
        v = self.manifest["vocab_size"]
        if ids_in.numel() and (int(ids_in.min()) < 0 or int(ids_in.max()) >= v):
            raise ValueError(f"input_ids must be in [0, {v})")
        lens = [seq] * b if lengths is None else [int(x) for x in torch.as_tensor(lengths).tolist()]
        if len(lens) != b or any(not 0 <= x <= seq for x in lens):
            raise ValueError(f"lengths must be {b} values in [0, {seq}], got {lens}")
        targets = SparseTargets(*(x.detach().cpu() for x in targets))
        _check_targets(targets, lens, v)
        t_ids = targets.ids
        lp = _rounded_down(targets.logprobs, self.dtype)
        tail = targets.tail_logmass.to(torch.float32)
        ids_cpu = ids_in.detach().cpu().to(torch.int32)
        for r in range(b):
            n = lens[r]
            self._buf.append((ids_cpu[r, :n].clone(), t_ids[r, :n].to(torch.int32).clone(),
                              lp[r, :n].clone(), tail[r, :n].clone()))
            self._buf_tokens += n
        if self._buf_tokens >= self.manifest["shard_tokens"]:
            self.flush()

    def flush(self) -> None:
        """Write the buffered sequences as one shard and list it in the manifest."""
        if not self._buf:
            return
        from safetensors.torch import save

        k = self.manifest["k"]
        lens = torch.tensor([x[0].numel() for x in self._buf], dtype=torch.int64)
        offsets = torch.zeros(len(self._buf) + 1, dtype=torch.int64)
        offsets[1:] = lens.cumsum(0)
        tensors = {
            "input_ids": torch.cat([x[0] for x in self._buf]),
            "ids": torch.cat([x[1] for x in self._buf]).reshape(-1, k),
            "logprobs": torch.cat([x[2] for x in self._buf]).reshape(-1, k),
            "tail_logmass": torch.cat([x[3] for x in self._buf]),
            "offsets": offsets,
        }
        index = len(self.manifest["shards"])
        name = f"shard-{index:05d}.safetensors"
        data = save({key: t.contiguous() for key, t in tensors.items()},
                    metadata={"format_version": str(FORMAT_VERSION), "shard": str(index)})
        _atomic_write(self.path / name, data)
        tokens = int(offsets[-1])
        self.manifest["shards"].append(dict(file=name, sequences=len(self._buf), tokens=tokens,
                                            bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
        self.manifest["num_sequences"] += len(self._buf)
        self.manifest["num_tokens"] += tokens
        self._write_manifest()
        self._buf, self._buf_tokens = [], 0

    def _write_manifest(self) -> None:
        _atomic_write(self.path / MANIFEST, (json.dumps(self.manifest, indent=1) + "\n").encode())

    def close(self) -> dict:
        """Write what is buffered and mark the cache complete; returns the manifest."""
        if not self._closed:
            self.flush()
            self.manifest["complete"] = True
            self._write_manifest()
            self._closed = True
        return self.manifest

    def __enter__(self) -> "TargetCacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was committed; leave the cache resumable (complete stays False)
            self._closed = True


def _rounded_down(logprobs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``logprobs`` in the storage dtype, each rounded toward -inf: a row's stored mass never
    exceeds the teacher's. Rounded to nearest, 50 tied log-probabilities of -4.0155 became -4.0 in
    bfloat16, 1.4% more mass than there is, which sparse_kd_loss(tail="tail") refuses."""
    out = logprobs.to(dtype)
    if dtype == logprobs.dtype:
        return out
    up = out.to(logprobs.dtype) > logprobs
    return torch.where(up, torch.nextafter(out, torch.full_like(out, -torch.inf)), out)


def _check_targets(targets: SparseTargets, lens: list[int], vocab_size: int) -> None:
    """Apply sparse_kd_loss's checks of its targets (id range, ids unique in a row except -1
    padding, no NaN or +inf log-probability at a valid slot, tail_logmass not NaN and <= 0) to the
    kept tokens of (B, L, k) targets, so that a cache never stores what the loss would refuse.
    An error names the argument as add() calls it and the sequence."""
    from ..sparse import _check_ids, _check_logprobs, _check_tail

    def check(ids: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor) -> None:
        shape_ref = torch.empty(()).expand(*ids.shape[:-1], vocab_size)  # lends its shape only
        _check_logprobs(lp, _check_ids(ids, shape_ref), None)
        _check_tail(tail, shape_ref, None)

    def renamed(exc: Exception, where: str) -> Exception:
        msg = re.sub(r"\b(" + "|".join(_ADD_NAMES) + r")\b", lambda m: _ADD_NAMES[m.group(1)],
                     str(exc))
        return type(exc)(msg + where)

    b, seq = targets.tail_logmass.shape
    keep = torch.arange(seq) < torch.tensor(lens, dtype=torch.int64).reshape(b, 1)
    try:  # all kept tokens at once; on an error, again per sequence to say which one
        check(targets.ids[keep], targets.logprobs[keep], targets.tail_logmass[keep])
        return
    except TypeError as exc:  # a dtype: no one sequence's fault
        raise renamed(exc, "") from None
    except ValueError as exc:
        first = exc
    for r, n in enumerate(lens):
        try:
            check(targets.ids[r, :n], targets.logprobs[r, :n], targets.tail_logmass[r, :n])
        except ValueError as exc:
            raise renamed(exc, f" (in sequence {r} of this add() call; a row is a token "
                               "position)") from None
    raise renamed(first, "") from None


class TargetCache:
    """Memory-mapped reader of a target cache.

    ``cache[i]`` is sequence i: dict(input_ids int64 (L,), ids int32 (L, k), logprobs float32
    (L, k), tail_logmass float32 (L,)); ``cache.targets(i)`` the same as SparseTargets.
    Opening checks the format version, the expected vocabulary size and tokenizer hash (one, or a
    tuple of those accepted: tokenizer_hashes), and (unless ``verify=False``) the size and sha256
    of every shard. A cache whose writer has not finished (interrupted, or still running) is
    refused unless ``allow_incomplete=True``: training on it
    would use a prefix of the data without saying so.
    """

    def __init__(self, path: Union[str, os.PathLike], *, expect_vocab_size: Optional[int] = None,
                 expect_tokenizer_hash: Union[str, tuple, None] = None, verify: bool = True,
                 allow_incomplete: bool = False) -> None:
        from safetensors import safe_open

        check.flag("allow_incomplete", allow_incomplete)
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise CacheError(f"no target cache at {self.path} ({MANIFEST} not found)")
        self.manifest = manifest
        if not manifest.get("complete", False) and not allow_incomplete:
            raise CacheError(f"the cache at {self.path} is incomplete ({manifest['num_sequences']} "
                             "sequences committed; its writer was interrupted or is still "
                             "running): finish it by re-running the same command, or open it "
                             "with allow_incomplete=True")
        if expect_vocab_size is not None and manifest["vocab_size"] != expect_vocab_size:
            raise CacheError(f"the cache at {self.path} has vocab_size {manifest['vocab_size']}, "
                             f"but {expect_vocab_size} was expected (another tokenizer/teacher?)")
        accepted = ((expect_tokenizer_hash,) if isinstance(expect_tokenizer_hash, str)
                    else expect_tokenizer_hash)
        if accepted is not None and manifest["tokenizer_hash"] not in accepted:
            raise CacheError(f"the cache at {self.path} was made with tokenizer hash "
                             f"{manifest['tokenizer_hash']!r}, not "
                             f"{' or '.join(repr(h) for h in accepted)} (another vocabulary)")
        self._files = []
        starts = [0]
        tokens = 0
        for shard in manifest["shards"]:
            if not isinstance(shard, dict) or any(key not in shard for key in SHARD_KEYS):
                raise CacheError(f"{self.path / MANIFEST} lists a shard without "
                                 f"{', '.join(SHARD_KEYS)}: {shard!r}")
            f = self.path / shard["file"]
            if not f.is_file():
                raise CacheError(f"shard {shard['file']} of {self.path} is missing")
            size = f.stat().st_size
            if size != shard["bytes"]:
                raise CacheError(f"shard {shard['file']} of {self.path} has {size} bytes, the "
                                 f"manifest says {shard['bytes']} (truncated or overwritten)")
            if verify and _sha256_file(f) != shard["sha256"]:
                raise CacheError(f"shard {shard['file']} of {self.path} fails its sha256 check "
                                 "(corrupted)")
            try:
                handle = safe_open(str(f), framework="pt")
                offsets = handle.get_tensor("offsets")
                ids_shape = handle.get_slice("ids").get_shape()
                lp_dtype = handle.get_slice("logprobs").get_dtype()
            except Exception as exc:
                raise CacheError(f"shard {shard['file']} of {self.path} cannot be read ({exc})") \
                    from exc
            if offsets.numel() != shard["sequences"] + 1 or int(offsets[-1]) != shard["tokens"]:
                raise CacheError(f"shard {shard['file']} of {self.path} disagrees with the manifest")
            if list(ids_shape) != [shard["tokens"], manifest["k"]] or \
                    lp_dtype != SAFETENSORS_DTYPES.get(manifest["dtype"]):
                raise CacheError(f"shard {shard['file']} of {self.path} holds ids {list(ids_shape)} "
                                 f"and {lp_dtype} log-probabilities, but the manifest says "
                                 f"k={manifest['k']} and dtype {manifest['dtype']}")
            self._files.append((handle, offsets))
            starts.append(starts[-1] + shard["sequences"])
            tokens += shard["tokens"]
        if starts[-1] != manifest["num_sequences"] or tokens != manifest["num_tokens"]:
            raise CacheError(f"the shards of {self.path} hold {starts[-1]} sequences and {tokens} "
                             f"tokens, the manifest says {manifest['num_sequences']} and "
                             f"{manifest['num_tokens']}")
        self._starts = torch.tensor(starts, dtype=torch.int64)

    def __getstate__(self) -> dict:
        # safetensors' file handles do not pickle: a DataLoader worker started by spawn or
        # forkserver (macOS, Windows, Python 3.14's Linux default) opens the shards again
        return {**self.__dict__, "_files": [(None, offsets) for _, offsets in self._files]}

    def __setstate__(self, state: dict) -> None:
        from safetensors import safe_open

        self.__dict__.update(state)
        self._files = [(safe_open(str(self.path / shard["file"]), framework="pt"), offsets)
                       for shard, (_, offsets) in zip(self.manifest["shards"], self._files)]

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def k(self) -> int:
        """Target slots per token (k of top-k, or the sample count): ids/logprobs are (L, k)."""
        return int(self.manifest["k"])

    @property
    def vocab_size(self) -> int:
        """The teacher's vocabulary size (every id is below it); expect_vocab_size checks it."""
        return int(self.manifest["vocab_size"])

    def _locate(self, index: int) -> tuple[int, int]:
        n = len(self)
        i = operator.index(index)   # an int (a float or a slice is a TypeError)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {index} out of range for a cache of {n} sequences")
        shard = int(torch.searchsorted(self._starts, torch.tensor(i), right=True)) - 1
        return shard, i - int(self._starts[shard])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        shard, j = self._locate(i)
        handle, offsets = self._files[shard]
        lo, hi = int(offsets[j]), int(offsets[j + 1])
        return {
            "input_ids": handle.get_slice("input_ids")[lo:hi].to(torch.int64),
            "ids": handle.get_slice("ids")[lo:hi],
            "logprobs": handle.get_slice("logprobs")[lo:hi].to(torch.float32),
            "tail_logmass": handle.get_slice("tail_logmass")[lo:hi],
        }

    def targets(self, i: int) -> SparseTargets:
        """Sequence i's targets as SparseTargets (L, k), ready for sparse_kd_loss; the input
        tokens are in ``cache[i]["input_ids"]``."""
        item = self[i]
        return SparseTargets(item["ids"], item["logprobs"], item["tail_logmass"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TargetCache({str(self.path)!r}, sequences={len(self)}, tokens={m['num_tokens']}, "
                f"mode={m['mode']}, k={m['k']}, vocab_size={m['vocab_size']})")


# ----------------------------------------------------------------------------- from a teacher


def _batch_parts(batch: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(input_ids (B, L), attention_mask or None) from a tensor, a (ids, mask) pair or a dict."""
    if isinstance(batch, dict):
        return torch.as_tensor(batch["input_ids"]), batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch[0], batch[1]
    return torch.as_tensor(batch), None


def _kept_lengths(input_ids: torch.Tensor, mask: Any) -> Optional[torch.Tensor]:
    """Tokens kept per row of (B, L) ``input_ids``: the attention mask's count (None without a
    mask: all of them). Only right padding (each row's 1s, then 0s) is taken: a row keeps its
    first count tokens, so a left-padded one would be stored as its pad positions."""
    if mask is None:
        return None
    m = torch.as_tensor(mask)
    if tuple(m.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids "
                         f"{tuple(input_ids.shape)}, got {tuple(m.shape)}")
    m = m.bool()
    if bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError("attention_mask must be right padding (each row's 1s, then its 0s): "
                         "with left padding the cache would hold the pad positions as tokens "
                         "(pad on the right: tokenizer.padding_side = 'right')")
    return m.sum(-1)


def _check_same_sequences(cache: "TargetCache", first: int, input_ids: torch.Tensor,
                          lengths: Optional[torch.Tensor], path: Any) -> None:
    """Raise unless sequences first, first + 1, ... of ``cache`` are these rows (their first
    lengths[r] tokens; all of them when ``lengths`` is None)."""
    lengths = [input_ids.shape[1]] * input_ids.shape[0] if lengths is None else lengths.tolist()
    for r, length in enumerate(lengths):
        held = cache[first + r]["input_ids"]
        if not torch.equal(held, input_ids[r, : int(length)].to(held)):
            raise CacheError(
                f"the cache at {path} holds other tokens as sequence {first + r} than this run's "
                "data: resuming would append this data's targets to another's. Use the data and "
                "settings the cache was started with, or another output directory")


def write_teacher_cache(
    model: torch.nn.Module,
    batches: Iterable[Any],
    path: Union[str, os.PathLike],
    *,
    k: int,
    mode: str = "topk",
    temperature: float = 1.0,
    dtype: Union[str, torch.dtype] = "float16",
    proposal_temperature: float = 1.0,
    seed: int = 0,
    teacher: str = "",
    tokenizer_hash: str = "",
    vocab_size: Optional[int] = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    device: Optional[Union[str, torch.device]] = None,
    backend: str = "auto",
    progress: bool = True,
) -> dict:
    """Run ``model`` (a transformers causal LM, or any module returning ``.logits`` or a logits
    tensor) over ``batches`` of token ids and cache its sparse targets at ``path``.

    ``batches`` yields (B, L) token-id tensors, (input_ids, attention_mask) pairs or dicts with
    those keys (right padding: a row keeps attention_mask.sum() tokens); its order must be the same
    on every run. What a previous, interrupted run committed is skipped without running the model
    (after checking that those sequences are this data's: other data is refused).
    Sampled targets (mode="sample", k draws) use seed (seed, index of the sequence), so a resumed
    run draws what an uninterrupted one would, whatever the batching. Returns the manifest.
    """
    from tqdm.auto import tqdm

    from .sample import teacher_sample
    from .topk import teacher_topk

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    extra = {"proposal_temperature": float(proposal_temperature), "seed": int(seed)} \
        if mode == "sample" else {}
    existing = read_manifest(path)
    done = 0 if existing is None else int(existing["num_sequences"])
    # a resumed run checks that the sequences it skips are the ones the cache holds: other data
    # (another corpus, sequence length or order) would be appended to them without a word
    committed = TargetCache(path, verify=False, allow_incomplete=True) if done else None
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is None and existing is not None:
        # (so that the writer compares this run's settings with the cache's before anything runs)
        vocab_size = existing["vocab_size"]
    writer: Optional[TargetCacheWriter] = None
    if vocab_size is not None:
        writer = TargetCacheWriter(path, vocab_size=int(vocab_size), mode=mode, k=k,
                                   temperature=temperature, dtype=dtype, teacher=teacher,
                                   tokenizer_hash=tokenizer_hash, shard_tokens=shard_tokens,
                                   extra=extra)
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=total, desc="teacher targets", unit="batch", disable=not progress)
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            input_ids, mask = _batch_parts(batch)
            if input_ids.dim() == 1:
                input_ids = input_ids.unsqueeze(0)
                mask = None if mask is None else torch.as_tensor(mask).unsqueeze(0)
            lengths = _kept_lengths(input_ids, mask)
            b = input_ids.shape[0]
            skip = min(max(done - seen, 0), b)
            if skip:
                _check_same_sequences(committed, seen, input_ids[:skip],
                                      None if lengths is None else lengths[:skip], path)
            first_seq = seen
            seen += b
            if skip == b:
                bar.update(1)
                bar.set_postfix(skipped=seen)
                continue
            with torch.inference_mode():
                kwargs = {} if mask is None else {"attention_mask": torch.as_tensor(mask).to(device)}
                out = model(input_ids.to(device), **kwargs)
                logits = out.logits if hasattr(out, "logits") else out
                if mode == "topk":
                    targets = teacher_topk(logits, k, temperature=temperature, backend=backend)
                else:  # a seed per sequence: the draws do not depend on the batching
                    rows = [teacher_sample(logits[r], k, temperature=temperature,
                                           proposal_temperature=proposal_temperature,
                                           seed=seed * 1_000_003 + first_seq + r, backend=backend)
                            for r in range(b)]
                    targets = SparseTargets(*(torch.stack(x) for x in zip(*rows)))
            if writer is None:
                writer = TargetCacheWriter(path, vocab_size=int(logits.shape[-1]), mode=mode, k=k,
                                           temperature=temperature, dtype=dtype, teacher=teacher,
                                           tokenizer_hash=tokenizer_hash,
                                           shard_tokens=shard_tokens, extra=extra)
            targets = SparseTargets(*(x.cpu() for x in targets))
            sl = slice(skip, b)
            writer.add(input_ids[sl].cpu(), SparseTargets(targets.ids[sl], targets.logprobs[sl],
                                                          targets.tail_logmass[sl]),
                       lengths=None if lengths is None else lengths[sl])
            bar.update(1)
        if writer is None:  # no batches, no cache yet, and nothing gave the vocabulary size
            raise ValueError("no batches and no vocab_size: nothing to write")
        return writer.close()
    finally:
        bar.close()
        model.train(was_training)
