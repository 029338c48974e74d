"""Data: text corpora, a locally trained tokenizer, packed token blocks, shifted labels, and a
deterministic, shardable batch order whose position is a function of the step (exact resume).
"""

from __future__ import annotations

import inspect
import json
import os
import random
from typing import Iterable, Optional, Sequence

import torch

IGNORE_INDEX = -100
BUILTIN_PREFIX = "builtin:"


# ---------------------------------------------------------------------------------------------
# labels


def shift_labels(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token labels aligned with the logits: labels[..., t] = input_ids[..., t + 1].

    The last position has no next token, and a padding position (attention_mask 0 at t or at
    t + 1, right or left padding) predicts nothing: all get ``ignore_index``. ``input_ids`` may
    itself be a labels tensor (transformers' convention: aligned with the inputs, -100 where
    nothing is scored), whose -100 entries stay ignored.
    """
    labels = torch.full_like(input_ids, ignore_index)
    labels[..., :-1] = input_ids[..., 1:]
    if attention_mask is not None:
        labels[..., :-1].masked_fill_(attention_mask[..., 1:] == 0, ignore_index)
        labels.masked_fill_(attention_mask == 0, ignore_index)
    return labels


def next_token_labels(batch: dict) -> torch.Tensor:
    """The labels a batch is scored against: its ``labels`` where it has them (aligned with
    ``input_ids`` as in transformers, -100 on prompt or padding tokens), else its ``input_ids``,
    shifted by one (shift_labels)."""
    source = batch["labels"] if "labels" in batch else batch["input_ids"]
    return shift_labels(source, batch.get("attention_mask"))


# ---------------------------------------------------------------------------------------------
# corpora


def pydoc_documents() -> list[str]:
    """Python's own documentation topics (pydoc_data ships with CPython): ~465k characters."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_docstrings(max_chars: int = 2_000_000,
                      modules: Sequence[str] = ("collections", "json", "argparse", "pathlib",
                                                "functools", "itertools", "typing", "datetime",
                                                "logging", "unittest", "asyncio", "email",
                                                "http.client", "urllib.parse", "re", "string",
                                                "textwrap", "shutil", "subprocess", "threading",
                                                "statistics", "decimal", "fractions", "random",
                                                "inspect", "dataclasses", "enum", "csv",
                                                "difflib", "heapq", "bisect", "socket", "zipfile",
                                                "tarfile", "contextlib", "operator", "os", "sys")
                      ) -> list[str]:
    """Docstrings of standard-library modules, their classes and functions (deterministic order)."""
    import importlib

    docs, total = [], 0
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception:  # pragma: no cover - a stripped-down Python
            continue
        members = [module] + [obj for _, obj in sorted(vars(module).items())
                              if (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", None) == module.__name__]
        for obj in members:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                docs.append(doc)
                total += len(doc)
                if total >= max_chars:
                    return docs
    return docs


def load_documents(spec: str) -> list[str]:
    """Documents from ``builtin:pydoc``, ``builtin:stdlib``, ``builtin:python`` (both), a .txt file
    (one document), a .jsonl file (one ``text`` field per line), or a directory of those."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name == "pydoc":
            return pydoc_documents()
        if name == "stdlib":
            return stdlib_docstrings()
        if name == "python":
            return pydoc_documents() + stdlib_docstrings()
        raise ValueError(f"unknown builtin corpus {spec!r}: use builtin:pydoc, builtin:stdlib or "
                         "builtin:python")
    if not os.path.exists(spec):
        raise FileNotFoundError(f"data path {spec!r} does not exist")
    if os.path.isdir(spec):
        docs = []
        for name in sorted(os.listdir(spec)):
            if name.endswith((".txt", ".jsonl")):
                docs.extend(load_documents(os.path.join(spec, name)))
        if not docs:
            raise ValueError(f"data directory {spec!r} holds no .txt or .jsonl file")
        return docs
    if spec.endswith(".jsonl"):
        docs = []
        with open(spec, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "text" not in row:
                    raise ValueError(f"{spec}:{lineno}: a .jsonl row needs a 'text' field")
                docs.append(row["text"])
        return docs
    with open(spec, encoding="utf-8") as fh:
        return [fh.read()]


def split_documents(docs: Sequence[str], eval_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle documents (seeded) and hold out about ``eval_fraction`` of the characters."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(d) for d in docs)
    held, held_chars = [], 0
    for i in order:
        if held_chars >= eval_fraction * total or len(held) >= len(docs) - 1:
            break
        held.append(i)
        held_chars += len(docs[i])
    held_set = set(held)
    return ([docs[i] for i in range(len(docs)) if i not in held_set],
            [docs[i] for i in sorted(held_set)])


# ---------------------------------------------------------------------------------------------
# tokenizer


def train_bpe_tokenizer(docs: Iterable[str], vocab_size: int, out_dir: Optional[str] = None):
    """Train a byte-level BPE tokenizer with the ``tokenizers`` library (no download) and return it
    as a transformers ``PreTrainedTokenizerFast`` (saved to ``out_dir`` when given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(docs), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|pad|>")
    if out_dir:
        fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist or is not a directory")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------------------------------
# packing


def pack_documents(docs: Iterable[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize documents, join them with EOS and cut the stream into (n, seq_len) blocks (the
    remainder is dropped). The labels of a block are ``shift_labels(block)``."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; packing needs a document separator")
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one sequence of "
                         f"seq_len={seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ---------------------------------------------------------------------------------------------
# datasets and batch order


class BlockDataset:
    """Packed token blocks; an item is ``{"input_ids": (T,)}``."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2 or blocks.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"blocks must be an integer (n, seq_len) tensor, got "
                             f"{tuple(blocks.shape)} {blocks.dtype}")
        self.blocks = blocks.long()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i]}


def as_dataset(data):
    """An (n, seq_len) token tensor becomes a BlockDataset; a dataset of dicts passes through."""
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        return BlockDataset(data)
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError("a dataset must be an (n, seq_len) token tensor or have __len__ and "
                        "__getitem__ returning dicts with input_ids")
    return data


# The right-padding value of a key, 0 for any other. Cached target ids pad with -1, the padding
# id sparse_kd_loss skips: a 0 would repeat id 0 in a padded position's row, which it refuses.
# Labels pad with -100 (a 0 would be a token to predict).
PAD_VALUES = {"ids": -1, "labels": IGNORE_INDEX}


def collate(items: Sequence[dict]) -> dict:
    """Stack per-sequence dicts into a batch; a sequence shorter than the longest is right-padded
    (input_ids with 0 and attention_mask 0, labels with -100, target ids with -1, other targets
    with zeros) so its padding predicts nothing."""
    longest = max(int(item["input_ids"].shape[0]) for item in items)
    out: dict = {}
    padded = any(int(item["input_ids"].shape[0]) != longest for item in items)
    for key in items[0]:
        tensors = [torch.as_tensor(item[key]) for item in items]
        if padded:
            fill = PAD_VALUES.get(key, 0)
            tensors = [torch.nn.functional.pad(t, _pad_spec(t, longest), value=fill)
                       for t in tensors]
        out[key] = torch.stack(tensors)
    if padded or "attention_mask" in items[0]:
        mask = torch.zeros(len(items), longest, dtype=torch.long)
        for row, item in enumerate(items):
            mask[row, : int(item["input_ids"].shape[0])] = 1
        if "attention_mask" in items[0]:
            mask = mask * out["attention_mask"]
        out["attention_mask"] = mask
    return out


def _pad_spec(t: torch.Tensor, length: int) -> tuple:
    # pad the first (token) dimension only
    return (0, 0) * (t.dim() - 1) + (0, length - t.shape[0])


class StepBatches:
    """Deterministic batch order over a dataset, sharded across ranks.

    The order is a function of (seed, step) alone: epoch e uses a permutation seeded by (seed, e),
    and optimizer step s takes the next ``global_batch = micro_batch_size * grad_accum_steps *
    world_size`` items of it. Rank r's micro-batch a of that step is slice
    ``(a * world_size + r)`` of the step's items. Resuming at step s therefore needs nothing but
    s. A final partial global batch of each epoch is dropped.
    """

    def __init__(self, dataset, micro_batch_size: int, grad_accum_steps: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.dataset = dataset
        self.micro = micro_batch_size
        self.accum = grad_accum_steps
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        if len(dataset) < self.global_batch:
            raise ValueError(
                f"the training set has {len(dataset)} sequences, fewer than one global batch "
                f"(micro_batch_size {micro_batch_size} x grad_accum_steps {grad_accum_steps} x "
                f"world_size {world_size} = {self.global_batch})")
        self.steps_per_epoch = len(dataset) // self.global_batch
        self._perm_epoch = -1
        self._perm: Optional[torch.Tensor] = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.dataset), generator=g)
            self._perm_epoch = epoch
        return self._perm

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's ``grad_accum_steps`` micro-batches of optimizer step ``step`` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        start = within * self.global_batch
        out = []
        for a in range(self.accum):
            lo = start + (a * self.world + self.rank) * self.micro
            idx = perm[lo: lo + self.micro].tolist()
            out.append(collate([self.dataset[i] for i in idx]))
        return out


def eval_batches(dataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 limit: int = 0, lockstep: bool = False) -> Iterable[Optional[dict]]:
    """Sequential evaluation batches; rank r takes every world_size-th batch. ``limit`` > 0 caps
    the number of batches over all ranks (so an evaluation reads the same sequences whatever the
    world size). ``lockstep``: every rank yields as many items as the busiest one, None once it
    is out of batches (FSDP2's forwards are collectives that every rank must join)."""
    n = len(dataset)
    starts = list(range(0, n, batch_size))
    if limit:
        starts = starts[:limit]
    mine = starts[rank::world_size]
    rounds = -(-len(starts) // world_size) if lockstep else len(mine)
    for j in range(rounds):
        if j < len(mine):
            lo = mine[j]
            yield collate([dataset[i] for i in range(lo, min(lo + batch_size, n))])
        else:
            yield None
