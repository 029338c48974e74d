"""`distill-ops train` launched as users launch it on several GPUs, by torchrun, here with two CPU
processes: the CLI initialises the process group from torchrun's environment (gloo on the CPU),
FSDP2 shards both models read from directories (rank 0 reads them), and one summary line is
printed (every rank printed one until 2026-12-07)."""

from __future__ import annotations

import json


from distill_ops.trainer.data import train_bpe_tokenizer
from distill_ops.trainer.models import llama
from gloo_worker import FSDP2_ON_GLOO, NEEDS_GLOO, torchrun

pytestmark = [NEEDS_GLOO, FSDP2_ON_GLOO]


def test_torchrun_two_processes_fsdp_from_the_cli(tmp_path):
    docs = ["import os\nprint(os.getcwd())\n" * 30, "Lists are mutable sequences. " * 40] * 3
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    tok = train_bpe_tokenizer(docs, 200, str(tmp_path / "student"))
    llama(len(tok), 32, 2, heads=2, max_positions=64).save_pretrained(tmp_path / "student")
    llama(len(tok), 48, 2, heads=2, max_positions=64, seed=1).save_pretrained(tmp_path / "teacher")
    (tmp_path / "run.yaml").write_text(
        "student: student\nteacher: teacher\ntrain_data: corpus.jsonl\nseq_len: 16\n"
        "micro_batch_size: 2\nmax_steps: 3\noutput_dir: run\nprogress: false\n"
        "eval_fraction: 0.2\ndevice: cpu\nfsdp: true\nfused_linear: true\n")
    run = torchrun(["-m", "distill_ops.cli", "train", "--config", "run.yaml"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done: 3 steps") == 1, run.stdout
    assert (tmp_path / "run" / "checkpoint-3" / "model.safetensors").is_file()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and "eval_ppl" in rows[-1]
