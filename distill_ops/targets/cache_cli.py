"""``distill-ops cache-teacher``: run a local transformers causal LM over token data and cache its
sparse targets (targets/cache.py). Interrupted runs resume where they stopped.

    distill-ops cache-teacher --model path/to/teacher --data corpus.txt --out cache/ --k 32
    python -m distill_ops.targets.cache_cli --model ... (the same)

--data: a text file (tokenized with the model's tokenizer), or a .pt / .npy file of token ids: a
1-D stream (cut into --seq-len sequences, the remainder dropped; a stream shorter than --seq-len
is one shorter sequence) or a 2-D array (one sequence per row, cut to --seq-len).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .cache import (DEFAULT_SHARD_TOKENS, DTYPES, MODES, model_fingerprint, read_manifest,
                    tokenizer_hash_to_record, tokenizer_hashes, write_teacher_cache)
from .sample import MAX_SAMPLES

# transformers' device_map strategies (a device name is --device's job)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
MODEL_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The cache-teacher flags, added to ``parser`` if given (e.g. a subcommand's parser), else to
    a new one."""
    p = parser or argparse.ArgumentParser(prog="distill-ops cache-teacher",
                                          description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--model", required=True, help="local transformers model directory (teacher)")
    p.add_argument("--data", required=True, help="text file, or .pt/.npy of token ids")
    p.add_argument("--out", required=True, help="cache directory (created; resumed if present)")
    p.add_argument("--k", type=int, required=True, help="top-k size, or number of samples")
    p.add_argument("--mode", choices=MODES, default="topk")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--proposal-temperature", type=float, default=1.0,
                   help="sample mode: draw from softmax(logits / (temperature * this))")
    p.add_argument("--seed", type=int, default=0, help="sample mode: base seed")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16",
                   help="storage dtype of the log-probabilities")
    p.add_argument("--model-dtype", choices=tuple(MODEL_DTYPES), default="auto",
                   help="dtype to load the teacher in")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                   help="spread a teacher larger than one GPU over the visible ones "
                   "(transformers' device_map; not with --device)")
    p.add_argument("--backend", default="auto", help="kernel backend for top-k/sampling")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    p.add_argument("--teacher-name", default=None, help="recorded in the manifest, with a "
                   "fingerprint of the model's files and --model-dtype (default: the model "
                   "directory's name)")
    p.add_argument("--max-sequences", type=int, default=None, help="stop after this many")
    p.add_argument("--no-progress", action="store_true")
    return p


def load_token_data(data: str, model_dir: str, seq_len: int) -> torch.Tensor:
    """(num_sequences, seq_len) int64 token ids (2-D input keeps its rows, cut to seq_len)."""
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {data}: no such file")
    if path.suffix == ".pt":
        ids = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(ids, (list, tuple)):
            ids = torch.cat([torch.as_tensor(x).reshape(-1) for x in ids])
        ids = torch.as_tensor(ids)
    elif path.suffix == ".npy":
        import numpy as np

        ids = torch.from_numpy(np.load(path).astype("int64"))
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = torch.tensor(tok(path.read_text())["input_ids"], dtype=torch.int64)
    ids = ids.to(torch.int64)
    if ids.dim() == 2:
        return ids[:, :seq_len]
    if ids.dim() != 1:
        raise ValueError(f"--data {data}: token ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
    n = ids.numel() // seq_len
    if n == 0:
        return ids.unsqueeze(0)
    return ids[: n * seq_len].reshape(n, seq_len)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``distill-ops cache-teacher``: load the teacher, tokenize --data and write (or resume) the
    cache at --out; returns the exit status. ``argv`` defaults to sys.argv[1:]."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # before the model loads: a bad value would otherwise fail minutes later, or obscurely
    for flag, value in (("--k", args.k), ("--seq-len", args.seq_len),
                        ("--batch-size", args.batch_size), ("--shard-tokens", args.shard_tokens)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.mode == "sample" and args.k > MAX_SAMPLES:
        parser.error(f"--k must be <= {MAX_SAMPLES} in sample mode (draws per token), got {args.k}")
    for flag, value in (("--temperature", args.temperature),
                        ("--proposal-temperature", args.proposal_temperature)):
        if not 0 < value < float("inf"):
            parser.error(f"{flag} must be > 0 and finite, got {value}")
    if args.device_map and args.device:
        parser.error("--device-map places the teacher itself: drop --device")
    if args.max_sequences is not None and args.max_sequences < 0:
        parser.error(f"--max-sequences must be >= 0, got {args.max_sequences}")
    from transformers import AutoModelForCausalLM

    seqs = load_token_data(args.data, args.model, args.seq_len)
    if args.max_sequences is not None:
        seqs = seqs[: args.max_sequences]
    kwargs = {}
    if MODEL_DTYPES[args.model_dtype] is not None:
        kwargs["dtype"] = MODEL_DTYPES[args.model_dtype]
    if args.device_map:
        # accelerate's hooks move the activations between the devices; the inputs start where
        # the embeddings are, the logits end on the last device
        model = AutoModelForCausalLM.from_pretrained(args.model, device_map=args.device_map,
                                                     **kwargs)
        device = model.get_input_embeddings().weight.device
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs).to(device)
    vocab = model.config.vocab_size
    if seqs.numel() and int(seqs.max()) >= vocab:
        raise ValueError(f"--data holds token id {int(seqs.max())} >= the model's vocab_size {vocab}")
    batches = [seqs[i:i + args.batch_size] for i in range(0, seqs.shape[0], args.batch_size)]
    tok_hash = tokenizer_hash_to_record(tokenizer_hashes(args.model), read_manifest(args.out))
    manifest = write_teacher_cache(
        model, batches, args.out, k=args.k, mode=args.mode, temperature=args.temperature,
        dtype=args.dtype, proposal_temperature=args.proposal_temperature, seed=args.seed,
        teacher=f"{args.teacher_name or Path(args.model).resolve().name}@"
                f"{model_fingerprint(args.model, args.model_dtype)}",
        tokenizer_hash=tok_hash, shard_tokens=args.shard_tokens, device=device,
        backend=args.backend, progress=not args.no_progress,
    )
    print(f"{args.out}: {manifest['num_sequences']} sequences, {manifest['num_tokens']} tokens, "
          f"{len(manifest['shards'])} shards ({manifest['mode']}, k={manifest['k']}, "
          f"{manifest['dtype']})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
