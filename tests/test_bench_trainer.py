"""bench/trainer_step.py on the CPU with tiny models: every provider trains the same step (equal
first losses), the JSON and the README table, and the max-batch search on a fake step."""

import json

import pytest
import torch

from bench import readme_table, trainer_step
from oracle import require_backend


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    require_backend("cpu")
    out = tmp_path_factory.mktemp("trainer") / "trainer.json"
    trainer_step.main(["--device", "cpu", "--shape", "tiny", "--batch", "2", "--seq", "32",
                       "--warmup", "1", "--steps", "2", "--out", str(out)])
    return out


def test_every_provider_trains_the_same_step(run):
    doc = json.loads(run.read_text())
    assert doc["schema"] == trainer_step.SCHEMA and doc["suite"] == "trainer"
    rows = {r["provider"]: r for r in doc["rows"]}
    assert set(rows) == set(trainer_step.PROVIDERS)
    # Liger-Kernel runs on GPUs only: its row says so (never dropped); every other provider runs.
    assert rows["liger"]["status"] == "unavailable" and rows["liger"]["error"]
    for name, r in rows.items():
        if name == "liger":
            continue
        assert r["status"] == "ok", r.get("error")
        assert r["tokens_per_s"] > 0 and r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
        assert r["student_params"] < r["teacher_params"]
    for fused in ("compile", "distill_ops", "distill_ops-fused"):
        # same models, same tokens: the fused losses and the eager one agree on the first step ...
        a, b = rows["eager"]["first_loss"], rows[fused]["first_loss"]
        assert a > 0 and abs(a - b) <= 1e-5 * a, fused
        # ... and the updates they make keep them together (their gradient is the eager one)
        a, b = rows["eager"]["last_loss"], rows[fused]["last_loss"]
        assert abs(a - b) <= 1e-3 * a, fused


def test_readme_table_has_the_trainer_rows(run):
    table = readme_table.render([run])
    assert "trainer step (tiny" in table
    assert "| eager |" in table and "| distill_ops |" in table
    assert trainer_step.render([]) is None


class _FakeStep:
    """Fits up to `limit` sequences; a larger batch raises the CUDA allocator's error."""

    def __init__(self, limit):
        self.limit, self.device, self.seen = limit, torch.device("cpu"), []
        self.opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    def __call__(self, ids):
        self.seen.append(ids.shape[0])
        if ids.shape[0] > self.limit:
            raise trainer_step._OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 0.0


@pytest.mark.parametrize("limit", [1, 5, 8, 13])
def test_max_batch_search_doubles_then_bisects(limit):
    step = _FakeStep(limit)
    got = trainer_step.find_max_batch(step, vocab=16, seq=4, deadline=float("inf"))
    assert got["max_batch"] == limit and got["max_exact"] and got["max_tokens"] == 4 * limit
    assert len(step.seen) <= 2 * limit.bit_length() + 1
    assert [b for b, ok in got["tries"] if ok] and all(ok == (b <= limit) for b, ok in got["tries"])


def test_max_batch_search_lets_other_errors_through():
    step = _FakeStep(4)
    step.__class__ = type("Broken", (_FakeStep,), {
        "__call__": lambda self, ids: (_ for _ in ()).throw(RuntimeError("shape mismatch"))})
    with pytest.raises(RuntimeError, match="shape mismatch"):
        trainer_step.find_max_batch(step, vocab=16, seq=4, deadline=float("inf"))


def test_find_max_needs_cuda():
    with pytest.raises(SystemExit, match="CUDA"):
        trainer_step.main(["--device", "cpu", "--find-max"])


def test_providers_take_spaces_or_commas(capsys):
    """As `python -m bench` does (bench/README.md: "Lists take spaces or commas")."""
    args = trainer_step.parse_args(["--providers", "eager,distill_ops", "liger"])
    assert args.providers == ["eager", "distill_ops", "liger"]
    with pytest.raises(SystemExit):
        trainer_step.parse_args(["--providers", "eager,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err
