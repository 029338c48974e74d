"""The offline target cache: exact round trip, sharding, resume after an interruption, corruption and
mismatch detection, write_teacher_cache on a tiny Llama, and the cache-teacher CLI."""

from __future__ import annotations

import json

import pytest
import torch

from distill_ops.sparse import teacher_sample, teacher_topk
from distill_ops.targets import (CacheError, SparseTargets, TargetCache, TargetCacheWriter,
                                 write_teacher_cache)
from distill_ops.targets.cache import read_manifest

V, K = 50, 4


def _batch(b, length, seed, k=K):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (b, length), generator=g)
    t = teacher_topk(torch.randn(b, length, V, generator=g) * 2, k, backend="torch")
    return input_ids, t


def _writer(path, **kw):
    opts = dict(vocab_size=V, mode="topk", k=K, temperature=1.0, dtype="float32",
                teacher="t", tokenizer_hash="h", shard_tokens=20)
    opts.update(kw)
    return TargetCacheWriter(path, **opts)


def _expected(batches, lengths=None):
    """Per-sequence dicts of what was added."""
    out = []
    for bi, (ids, t) in enumerate(batches):
        for r in range(ids.shape[0]):
            n = ids.shape[1] if lengths is None else lengths[bi][r]
            out.append(dict(input_ids=ids[r, :n], ids=t.ids[r, :n], logprobs=t.logprobs[r, :n],
                            tail_logmass=t.tail_logmass[r, :n]))
    return out


def assert_rounded_down(stored, exact, dtype):
    """``stored`` (read back as float32) is ``exact`` rounded toward -inf in ``dtype``: at or
    below it, and the next value of dtype up is above it."""
    exact = exact.float()
    if dtype == torch.float32:
        assert torch.equal(stored, exact)
        return
    assert torch.equal(stored.to(dtype).float(), stored)   # a value of dtype
    above = torch.nextafter(stored.to(dtype), torch.tensor(torch.inf, dtype=dtype)).float()
    assert (stored <= exact).all() and (above > exact).all()


def _assert_cache_equals(cache, expected, dtype=torch.float32):
    assert len(cache) == len(expected)
    for i, want in enumerate(expected):
        got = cache[i]
        assert torch.equal(got["input_ids"], want["input_ids"].long())
        assert got["ids"].dtype == torch.int32 and torch.equal(got["ids"], want["ids"])
        assert got["logprobs"].dtype == torch.float32
        assert_rounded_down(got["logprobs"], want["logprobs"], dtype)
        assert torch.equal(got["tail_logmass"], want["tail_logmass"])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_exact(tmp_path, dtype):
    batches = [_batch(3, 7, seed=i) for i in range(4)]
    lengths = [[7, 5, 0], [7, 7, 7], [1, 2, 3], [7, 6, 7]]
    with _writer(tmp_path, dtype=dtype) as w:
        for (ids, t), lens in zip(batches, lengths):
            w.add(ids, t, lengths=torch.tensor(lens))
        w.add(batches[0][0][0], SparseTargets(*(x[0] for x in batches[0][1])))  # a 1-D sequence
    cache = TargetCache(tmp_path, expect_vocab_size=V, expect_tokenizer_hash="h")
    expected = _expected(batches, lengths) + _expected([(batches[0][0][:1], SparseTargets(
        *(x[:1] for x in batches[0][1])))])
    _assert_cache_equals(cache, expected, getattr(torch, dtype))
    m = cache.manifest
    assert m["complete"] and m["num_sequences"] == 13 and len(m["shards"]) > 1
    assert m["num_tokens"] == sum(map(sum, lengths)) + 7
    assert sum(s["tokens"] for s in m["shards"]) == m["num_tokens"]
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert cache[-1]["input_ids"].shape == (7,) and cache.targets(0).k == K
    with pytest.raises(IndexError):
        cache[13]


def test_resume_after_interruption(tmp_path):
    """A run dies with buffered sequences, a half-written temp file and an unlisted shard: the
    re-opened writer removes the debris, continues after the last listed shard and ends with
    exactly the content of an uninterrupted run."""
    batches = [_batch(2, 6, seed=i) for i in range(6)]
    full, part = tmp_path / "full", tmp_path / "part"
    with _writer(full) as w:
        for ids, t in batches:
            w.add(ids, t)
    w = _writer(part, shard_tokens=30)
    for ids, t in batches[:4]:
        w.add(ids, t)
    committed = w.num_sequences
    assert 0 < committed < 8 and not read_manifest(part)["complete"]
    del w  # the process dies: the buffer is lost
    # an unfinished cache is no training set unless asked for: it is a prefix of the data
    with pytest.raises(CacheError, match=f"incomplete \\({committed} sequences committed"):
        TargetCache(part)
    assert len(TargetCache(part, allow_incomplete=True)) == committed
    for where in (part, full):  # refused whether or not the cache is complete
        with pytest.raises(TypeError, match="allow_incomplete must be a bool, got str"):
            TargetCache(where, allow_incomplete="yes")
    (part / "shard-00007.safetensors.tmp").write_bytes(b"half a shard")
    (part / "shard-00009.safetensors").write_bytes(b"never listed")
    w = _writer(part, shard_tokens=30)
    assert w.num_sequences == committed
    assert not any(f.name.endswith(".tmp") or f.name == "shard-00009.safetensors"
                   for f in part.iterdir())
    seqs = [(ids[r], SparseTargets(*(x[r] for x in t))) for ids, t in batches for r in range(2)]
    for ids, t in seqs[committed:]:
        w.add(ids, t)
    w.close()
    a, b = TargetCache(full), TargetCache(part)
    _assert_cache_equals(b, [a[i] for i in range(len(a))])


def test_reopen_with_other_settings_is_refused(tmp_path):
    with _writer(tmp_path) as w:
        w.add(*_batch(1, 5, seed=0))
    for kw, field in [({"k": 8}, "k"), ({"vocab_size": 51}, "vocab_size"),
                      ({"dtype": "float16"}, "dtype"), ({"mode": "sample"}, "mode"),
                      ({"tokenizer_hash": "x"}, "tokenizer_hash"), ({"temperature": 2.0}, "temperature")]:
        with pytest.raises(CacheError, match=f"written with {field}="):
            _writer(tmp_path, **kw)


def _one_shard_cache(path):
    with _writer(path, shard_tokens=10) as w:
        for i in range(3):
            w.add(*_batch(2, 6, seed=i))
    return read_manifest(path)


def test_corruption_is_detected(tmp_path):
    m = _one_shard_cache(tmp_path)
    victim = tmp_path / m["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensor data
    victim.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard-00001.safetensors .* fails its sha256 check"):
        TargetCache(tmp_path)
    victim.write_bytes(bytes(data[:-100]))  # truncated
    with pytest.raises(CacheError, match="shard-00001.safetensors .* has .* bytes, the manifest"):
        TargetCache(tmp_path)
    victim.unlink()
    with pytest.raises(CacheError, match="shard-00001.safetensors .* is missing"):
        TargetCache(tmp_path)


def test_format_and_identity_checks(tmp_path):
    m = _one_shard_cache(tmp_path)
    assert len(TargetCache(tmp_path, expect_vocab_size=V, expect_tokenizer_hash="h")) == 6
    with pytest.raises(CacheError, match="vocab_size 50, but 64 was expected"):
        TargetCache(tmp_path, expect_vocab_size=64)
    with pytest.raises(CacheError, match="tokenizer hash 'h', not 'other'"):
        TargetCache(tmp_path, expect_tokenizer_hash="other")
    m["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="format_version 99"):
        TargetCache(tmp_path)
    with pytest.raises(CacheError, match="no target cache"):
        TargetCache(tmp_path / "nowhere")


def test_a_manifest_that_disagrees_with_its_shards_is_refused(tmp_path):
    good = _one_shard_cache(tmp_path)
    for edit, match in [(dict(k=8), "manifest says k=8"),
                        (dict(dtype="float16"), "manifest says k=4 and dtype float16"),
                        (dict(num_sequences=7), "hold 6 sequences and 36 tokens, the manifest "
                                                "says 7 and 36"),
                        (dict(num_tokens=35), "the manifest says 6 and 35")]:
        (tmp_path / "manifest.json").write_text(json.dumps({**good, **edit}))
        with pytest.raises(CacheError, match=match):
            TargetCache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in good.items()
                                                        if k != "shards"}))
    with pytest.raises(CacheError, match="lacks shards"):
        TargetCache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps([good]))
    with pytest.raises(CacheError, match="not a manifest"):
        TargetCache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**good, "shards": [{"file": "x"}]}))
    with pytest.raises(CacheError, match="lists a shard without"):
        TargetCache(tmp_path)


def test_indexing_and_pickling(tmp_path):
    """Indices are ints (a float is refused, not truncated); the reader pickles, as DataLoader
    workers started by spawn or forkserver need (safetensors' handles do not)."""
    import pickle

    _one_shard_cache(tmp_path)
    cache = TargetCache(tmp_path)
    with pytest.raises(TypeError):
        cache[1.5]
    with pytest.raises(IndexError, match="sequence -7 out of range for a cache of 6"):
        cache[-7]
    assert torch.equal(cache[-1]["ids"], cache[5]["ids"])
    again = pickle.loads(pickle.dumps(cache))
    for i in range(len(cache)):
        for key, value in cache[i].items():
            assert torch.equal(again[i][key], value)


def test_16_bit_storage_never_adds_mass(tmp_path):
    """Log-probabilities are stored rounded toward -inf: 50 tied -4.0155 rounded to nearest were
    -4.0 in bfloat16, a row mass of 1.014 with the tail, which sparse_kd_loss(tail="tail")
    refuses; rounded down the row is accepted."""
    from distill_ops import sparse_kd_loss

    lp = torch.full((1, 2, 50), -4.0155)
    tail = torch.log1p(-lp.double().exp().sum(-1)).float()
    ids = torch.arange(50, dtype=torch.int32).expand(1, 2, 50)
    with _writer(tmp_path, vocab_size=60, k=50, dtype="bfloat16") as w:
        w.add(torch.zeros(1, 2, dtype=torch.long), SparseTargets(ids, lp, tail))
    got = TargetCache(tmp_path).targets(0)
    assert_rounded_down(got.logprobs, lp[0], torch.bfloat16)
    loss = sparse_kd_loss(torch.randn(2, 60), got.ids, got.logprobs, tail="tail",
                          tail_logmass=got.tail_logmass, backend="torch")
    assert torch.isfinite(loss)


def test_add_checks_shapes(tmp_path):
    w = _writer(tmp_path)
    ids, t = _batch(2, 5, seed=0)
    with pytest.raises(ValueError, match="targets must have ids and logprobs of shape"):
        w.add(ids[:, :4], t)
    with pytest.raises(ValueError, match="input_ids must be in"):
        w.add(ids + V, t)
    with pytest.raises(ValueError, match="lengths must be 2 values"):
        w.add(ids, t, lengths=[5, 9])


# ----------------------------------------------------------------------------- from a teacher


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama with random weights and a small BPE tokenizer, saved as a local model dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return model, path


def test_the_tokenizer_check_compares_vocabularies(tmp_path, tiny_llama):
    """A cache stores token ids, so what must match is the vocabulary. The check compared the
    tokenizer files' sha256: the same tokenizer re-saved with a chat template was refused. Now the
    cache records the vocabulary's fingerprint; a cache that recorded the files' hash (before)
    still opens with the same files; another vocabulary is refused."""
    from transformers import AutoTokenizer

    from distill_ops.targets.cache import tokenizer_hash, tokenizer_hashes

    _, model_dir = tiny_llama
    resaved = tmp_path / "resaved"
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(resaved)
    assert tokenizer_hash(resaved) != tokenizer_hash(model_dir)       # other files
    assert tokenizer_hashes(resaved)[0] == tokenizer_hashes(model_dir)[0]
    for recorded in (tokenizer_hashes(model_dir)[0], tokenizer_hash(model_dir)):
        out = tmp_path / f"cache-{recorded[:5]}"
        with _writer(out, tokenizer_hash=recorded) as w:
            w.add(*_batch(2, 6, seed=1))
        if recorded.startswith("vocab:"):
            TargetCache(out, expect_tokenizer_hash=tokenizer_hashes(resaved))
        TargetCache(out, expect_tokenizer_hash=tokenizer_hashes(model_dir))
    other = tmp_path / "other"
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    a, b = list(vocab["model"]["vocab"])[5:7]       # two tokens swap ids
    vocab["model"]["vocab"][a], vocab["model"]["vocab"][b] = (vocab["model"]["vocab"][b],
                                                              vocab["model"]["vocab"][a])
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(CacheError, match="another vocabulary"):
        TargetCache(out, expect_tokenizer_hash=tokenizer_hashes(other))


class _Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0
        self.config = model.config

    def forward(self, input_ids, **kw):
        self.calls += 1
        return self.model(input_ids, **kw)


def _token_batches(n_batches, b=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (b, length), generator=g) for _ in range(n_batches)]


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_write_teacher_cache_and_resume(tmp_path, tiny_llama, mode):
    model, _ = tiny_llama
    batches = _token_batches(5)
    opts = dict(k=6, mode=mode, temperature=1.5, dtype="float32", shard_tokens=30,
                proposal_temperature=1.0 if mode == "topk" else 2.0, seed=4, progress=False,
                backend="torch")
    full = write_teacher_cache(model, batches, tmp_path / "full", **opts)
    assert full["complete"] and full["num_sequences"] == 10 and full["extra"] == (
        {} if mode == "topk" else {"proposal_temperature": 2.0, "seed": 4})
    cache = TargetCache(tmp_path / "full", expect_vocab_size=97)
    with torch.no_grad():
        logits = torch.cat([model(b).logits for b in batches])  # batched as the writer does
    if mode == "topk":
        want = teacher_topk(logits, 6, temperature=1.5, backend="torch")
        for i in range(10):
            assert torch.equal(cache[i]["ids"], want.ids[i])
            assert torch.equal(cache[i]["logprobs"], want.logprobs[i])
            assert torch.equal(cache[i]["input_ids"], torch.cat(batches)[i])

    # An interrupted run: the batch iterator dies after 3 batches.
    def dying():
        for i, b in enumerate(batches):
            if i == 3:
                raise KeyboardInterrupt
            yield b

    with pytest.raises(KeyboardInterrupt):
        write_teacher_cache(model, dying(), tmp_path / "part", **opts)
    done = read_manifest(tmp_path / "part")["num_sequences"]
    assert 0 < done < 10
    counting = _Counting(model)
    write_teacher_cache(counting, batches, tmp_path / "part", **opts)
    assert counting.calls == 5 - done // 2  # the committed batches are not recomputed
    a, b = TargetCache(tmp_path / "full"), TargetCache(tmp_path / "part")
    _assert_cache_equals(b, [a[i] for i in range(len(a))])
    # A finished cache is a no-op to re-run.
    counting.calls = 0
    write_teacher_cache(counting, batches, tmp_path / "part", **opts)
    assert counting.calls == 0


def test_resume_with_other_data_is_refused(tmp_path, tiny_llama):
    """A resumed write skips what the cache holds by count: it checks the skipped sequences are
    this run's, so another corpus or sequence length is refused, not appended."""
    model, _ = tiny_llama
    opts = dict(k=4, dtype="float32", progress=False, backend="torch", shard_tokens=18)

    def first_two(batches):
        for i, b in enumerate(batches):
            if i == 2:
                raise KeyboardInterrupt
            yield b

    with pytest.raises(KeyboardInterrupt):
        write_teacher_cache(model, first_two(_token_batches(4)), tmp_path / "c", **opts)
    assert read_manifest(tmp_path / "c")["num_sequences"] == 4
    for other in (_token_batches(4, seed=1), _token_batches(4, length=5)):
        with pytest.raises(CacheError, match="holds other tokens as sequence 0"):
            write_teacher_cache(model, other, tmp_path / "c", **opts)
    assert write_teacher_cache(model, _token_batches(4), tmp_path / "c", **opts)["complete"]


def test_write_teacher_cache_attention_mask(tmp_path, tiny_llama):
    model, _ = tiny_llama
    ids = _token_batches(1, b=3, length=8)[0]
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    write_teacher_cache(model, [{"input_ids": ids, "attention_mask": mask}], tmp_path, k=3,
                        progress=False, backend="torch")
    cache = TargetCache(tmp_path)
    assert [cache[i]["input_ids"].numel() for i in range(3)] == [8, 5, 8]


def test_left_padding_is_refused(tmp_path, tiny_llama):
    """A row keeps its first attention_mask.sum() tokens: left-padded, that was its pad
    positions, stored without a word."""
    model, _ = tiny_llama
    ids = _token_batches(1, b=2, length=8)[0]
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="attention_mask must be right padding"):
        write_teacher_cache(model, [{"input_ids": ids, "attention_mask": mask}], tmp_path, k=3,
                            progress=False, backend="torch")


class _NoConfig(torch.nn.Module):
    """A teacher without .config: the vocabulary size is only known from its logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, **kw):
        return self.model(input_ids, **kw).logits


def test_a_finished_cache_rerun_with_other_settings_is_refused(tmp_path, tiny_llama):
    """Without a model config a finished cache was marked complete again, whatever was asked."""
    teacher = _NoConfig(tiny_llama[0])
    batches = _token_batches(2)
    opts = dict(k=4, dtype="float16", progress=False, backend="torch")
    write_teacher_cache(teacher, batches, tmp_path, **opts)
    for other, field in [(dict(k=8), "k"), (dict(dtype="float32"), "dtype"),
                         (dict(mode="sample"), "mode"), (dict(temperature=3.0), "temperature")]:
        with pytest.raises(CacheError, match=f"written with {field}="):
            write_teacher_cache(teacher, batches, tmp_path, **{**opts, **other})
    assert write_teacher_cache(teacher, batches, tmp_path, **opts)["complete"]


def test_sampled_draws_do_not_depend_on_the_batching(tmp_path, tiny_llama):
    """Each sequence has its own seed: the same data cached in batches of 2 and of 3 (as a run
    resumed with another batch size would) holds the same draws."""
    model, _ = tiny_llama
    seqs = torch.cat(_token_batches(3))
    opts = dict(k=6, mode="sample", seed=3, dtype="float32", progress=False, backend="torch")
    for b in (2, 3):
        write_teacher_cache(model, [seqs[i:i + b] for i in range(0, 6, b)], tmp_path / str(b),
                            **opts)
    a, b = TargetCache(tmp_path / "2"), TargetCache(tmp_path / "3")
    _assert_cache_equals(b, [a[i] for i in range(len(a))])


def test_model_fingerprint_tells_same_named_teachers_apart(tmp_path, tiny_llama):
    from distill_ops.targets.cache import model_fingerprint

    model, model_dir = tiny_llama
    other = type(model)(model.config)
    for name, m in (("a", model), ("b", other)):
        m.save_pretrained(tmp_path / name / "final")
    fa, fb = model_fingerprint(tmp_path / "a" / "final"), model_fingerprint(tmp_path / "b" / "final")
    assert fa != fb and len(fa) == 16
    assert model_fingerprint(tmp_path / "a" / "final") == fa
    assert model_fingerprint(tmp_path / "a" / "final", "bfloat16") != fa


def test_cli_refuses_bad_flags_before_loading(tmp_path, capsys):
    from distill_ops.targets.cache_cli import main

    base = ["--model", str(tmp_path / "nowhere"), "--data", str(tmp_path / "none.pt"),
            "--out", str(tmp_path / "c")]
    for extra, match in [(["--k", "4", "--seq-len", "0"], "--seq-len must be >= 1"),
                         (["--k", "4", "--batch-size", "0"], "--batch-size must be >= 1"),
                         (["--k", "2000", "--mode", "sample"], "--k must be <= 1024"),
                         (["--k", "4", "--temperature", "-1"], "--temperature must be > 0"),
                         (["--k", "4", "--device-map", "bogus"], "--device-map: invalid choice"),
                         (["--k", "4", "--device-map", "auto", "--device", "cpu"],
                          "--device-map places the teacher itself: drop --device")]:
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        assert exc.value.code == 2 and match in capsys.readouterr().err


def test_cli(tmp_path, tiny_llama):
    from distill_ops.targets.cache import model_fingerprint, tokenizer_hash, tokenizer_hashes
    from distill_ops.targets.cache_cli import main

    _, model_dir = tiny_llama
    stream = torch.randint(0, 97, (100,), generator=torch.Generator().manual_seed(1))
    torch.save(stream, tmp_path / "ids.pt")
    out = tmp_path / "cache"
    args = ["--model", str(model_dir), "--data", str(tmp_path / "ids.pt"), "--out", str(out),
            "--k", "5", "--seq-len", "16", "--batch-size", "2", "--dtype", "bfloat16",
            "--device", "cpu", "--backend", "torch", "--no-progress"]
    assert main(args) == 0
    cache = TargetCache(out, expect_vocab_size=97, expect_tokenizer_hash=tokenizer_hashes(model_dir))
    assert len(cache) == 6 and cache.manifest["dtype"] == "bfloat16"
    assert torch.equal(cache[2]["input_ids"], stream[32:48])
    assert cache.manifest["teacher"] == f"{model_dir.name}@{model_fingerprint(model_dir)}"
    assert cache.manifest["tokenizer_hash"].startswith("vocab:")
    # a cache that recorded the tokenizer files' hash (older releases) is re-run without a
    # complaint: the CLI keeps the fingerprint it finds when it is this tokenizer's
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer_hash"] = tokenizer_hash(model_dir)
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(args) == 0
    # a teacher spread by a device_map (all on the CPU here): the same targets
    assert main([a for a in args if a not in ("--device", "cpu")] + [
        "--device-map", "auto", "--out", str(tmp_path / "mapped")]) == 0
    mapped = TargetCache(tmp_path / "mapped")
    assert all(torch.equal(mapped[i]["ids"], cache[i]["ids"]) for i in range(len(cache)))
    # text data, tokenized with the model's tokenizer; sampled targets
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog " * 6)
    assert main(["--model", str(model_dir), "--data", str(tmp_path / "corpus.txt"), "--out",
                 str(tmp_path / "c2"), "--k", "4", "--mode", "sample", "--seq-len", "8",
                 "--device", "cpu", "--no-progress"]) == 0
    c2 = TargetCache(tmp_path / "c2")
    assert c2.manifest["mode"] == "sample" and len(c2) >= 2
    lp = c2[0]["logprobs"]
    assert torch.allclose(lp.exp().nan_to_num().sum(-1), torch.ones(lp.shape[0]), atol=1e-2)


def test_sampled_targets_cached_use_distinct_seeds_per_batch(tmp_path, tiny_llama):
    """Two identical batches get different draws (the seed includes the sequence index)."""
    model, _ = tiny_llama
    b = _token_batches(1)[0]
    write_teacher_cache(model, [b, b], tmp_path, k=8, mode="sample", progress=False,
                        backend="torch")
    cache = TargetCache(tmp_path)
    assert not torch.equal(cache[0]["ids"], cache[2]["ids"])
    direct = teacher_sample(model(b).logits.detach(), 8, seed=0, backend="torch")
    assert torch.equal(cache[0]["ids"], direct.ids[0])


# ----------------------------------------------------------------------------- bad targets, strays


def test_add_refuses_nan_logprobs_and_repeated_ids(tmp_path):
    """The checks sparse_kd_loss applies to its targets (ids unique per row except -1 padding,
    no NaN log-probability at a valid slot, tail_logmass <= 0 and not NaN) run before anything is
    buffered or written; the error names the argument, the sequence and the row."""
    w = _writer(tmp_path, shard_tokens=1)   # every accepted add() would write a shard at once
    ids, t = _batch(2, 5, seed=0)
    bad = t.logprobs.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"targets\.logprobs has NaN.*sequence 0"):
        w.add(ids, SparseTargets(t.ids, bad, t.tail_logmass))
    rep = t.ids.clone()
    rep[1, 3, 1] = rep[1, 3, 0]
    with pytest.raises(ValueError, match=r"targets\.ids repeats id .* row 3.*sequence 1"):
        w.add(ids, SparseTargets(rep, t.logprobs, t.tail_logmass))
    tail = t.tail_logmass.clone()
    tail[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"targets\.tail_logmass has NaN.*sequence 1"):
        w.add(ids, SparseTargets(t.ids, t.logprobs, tail))
    with pytest.raises(ValueError, match=r"targets\.ids must be in \[0, 50\) or -1"):
        w.add(ids, SparseTargets(t.ids + V, t.logprobs, t.tail_logmass))
    assert w.pending_sequences == 0 and not any(tmp_path.iterdir())
    # -1 padding may repeat, and what lengths cut off is neither stored nor checked
    pad_ids, pad_lp = t.ids.clone(), t.logprobs.clone()
    pad_ids[:, :, 2:] = -1
    pad_lp[:, :, 2:] = float("-inf")
    pad_lp[0, 4, 0] = float("nan")                         # beyond lengths[0] = 4
    w.add(ids, SparseTargets(pad_ids, pad_lp, t.tail_logmass), lengths=[4, 5])
    w.close()
    cache = TargetCache(tmp_path)
    assert len(cache) == 2 and torch.equal(cache[0]["ids"], pad_ids[0, :4].int())


def test_add_and_constructor_check_k(tmp_path):
    w = _writer(tmp_path / "a")
    ids, t = _batch(2, 5, seed=0, k=K - 1)
    with pytest.raises(ValueError, match=f"targets have k = {K - 1} slots, but this cache "
                                         f"holds k = {K}"):
        w.add(ids, t)
    with pytest.raises(ValueError, match="k = 9 is more than vocab_size = 5"):
        TargetCacheWriter(tmp_path / "b", vocab_size=5, mode="topk", k=9, temperature=1.0)
    assert not (tmp_path / "b").exists()
    # sampled targets draw with replacement and pad merged duplicates: k may exceed V
    TargetCacheWriter(tmp_path / "c", vocab_size=5, mode="sample", k=9, temperature=1.0)


def test_shards_without_manifest_are_kept_and_refused(tmp_path):
    """A directory with shard files but no manifest (lost, deleted, or a run interrupted between
    its first shard and its first manifest) is refused: nothing in it is deleted."""
    _one_shard_cache(tmp_path / "full")
    d = tmp_path / "copy"
    d.mkdir()
    for f in (tmp_path / "full").iterdir():
        if f.name != "manifest.json":
            (d / f.name).write_bytes(f.read_bytes())
    (d / "manifest.json.tmp").write_bytes(b"half a manifest")
    before = sorted(f.name for f in d.iterdir())
    assert [n for n in before if n.startswith("shard-")] == [f"shard-0000{i}.safetensors"
                                                             for i in range(3)]
    with pytest.raises(CacheError, match=r"3 shard files \(shard-00000\.safetensors, "
                                         r"shard-00001\.safetensors, .*\) but no manifest\.json"):
        _writer(d)
    assert sorted(f.name for f in d.iterdir()) == before   # nothing deleted
    with pytest.raises(CacheError, match="no manifest.json"):
        write_teacher_cache(torch.nn.Linear(1, 1), [], d, k=K, vocab_size=V, progress=False)
    assert sorted(f.name for f in d.iterdir()) == before


def test_only_the_writers_own_files_are_cleaned(tmp_path):
    """Strays are the writer's own names (its temp files; with a manifest, shards it never listed);
    other files in the directory are the user's."""
    (tmp_path / "notes.tmp").write_text("mine")
    (tmp_path / "shard-notes.txt").write_text("mine")
    (tmp_path / "shard-00000.safetensors.tmp").write_bytes(b"half a shard")
    (tmp_path / "manifest.json.tmp").write_bytes(b"half a manifest")
    with _writer(tmp_path) as w:
        w.add(*_batch(1, 5, seed=0))
    w = _writer(tmp_path)  # re-open: a manifest now exists
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "manifest.json", "notes.tmp", "shard-00000.safetensors", "shard-notes.txt"]


def test_public_cache_functions_are_documented():
    import inspect

    from distill_ops.targets import cache_cli

    for fn in (TargetCache.k, TargetCache.vocab_size, TargetCache.targets,
               TargetCacheWriter.pending_sequences, cache_cli.build_parser, cache_cli.main):
        f = fn.fget if isinstance(fn, property) else fn
        assert (inspect.getdoc(f) or "").strip(), f.__qualname__
        assert "return" in f.__annotations__, f.__qualname__
