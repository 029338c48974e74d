"""`distill-ops env`: the installation report (distill_ops/env_report.py) and its CLI entry."""

from __future__ import annotations

import json
import os

import pytest
import torch

from distill_ops import backends, cli, env_report


def run_cli(capsys, *args: str) -> str:
    assert cli.main(["env", *args]) == 0
    return capsys.readouterr().out


def test_json_report_says_what_auto_picks(capsys, monkeypatch):
    """The JSON form: the same picks as the dispatcher's for a CPU tensor, the extension's and
    Triton's status, and no DISTILL_OPS_* variables when none is set."""
    for key in [k for k in os.environ if k.startswith("DISTILL_OPS_")]:
        monkeypatch.delenv(key)
    r = json.loads(run_cli(capsys, "--json"))
    assert r["auto"]["cpu"]["dense"] == backends.resolve("auto", torch.device("cpu"))
    assert r["extension"]["cpu"] == backends.native_status("cpu")[0]
    assert r["packages"]["torch"] and r["distill_ops"]["version"]
    assert not any(k.startswith("DISTILL_OPS_") for k in r["environment"])


def test_backend_variable_is_shown_and_followed(capsys, monkeypatch):
    """DISTILL_OPS_BACKEND=torch: every pick is the reference, and the variable is listed."""
    monkeypatch.setenv("DISTILL_OPS_BACKEND", "torch")
    text = run_cli(capsys)
    assert "CPU tensors:  torch (every op)" in text and "CUDA tensors: torch (every op)" in text
    assert "DISTILL_OPS_BACKEND=torch" in text


def test_a_backend_that_cannot_run_is_reported_not_raised(capsys, monkeypatch):
    """DISTILL_OPS_BACKEND=cuda on CPU tensors: the dispatcher's error, as the pick's line."""
    monkeypatch.setenv("DISTILL_OPS_BACKEND", "cuda")
    r = json.loads(run_cli(capsys, "--json"))
    assert r["auto"]["cpu"]["dense"].startswith("error: DISTILL_OPS_BACKEND='cuda' cannot run")


def test_sparse_ops_leave_the_cuda_kernels_out_of_auto(monkeypatch):
    """With CUDA kernels built, auto picks them for the dense losses on CUDA tensors but Triton
    for the sparse ops (their CUDA kernels run only when named): the report shows both."""
    monkeypatch.delenv("DISTILL_OPS_BACKEND", raising=False)
    if not backends.triton_status()[0]:
        pytest.skip("triton not importable")
    real = backends.native_status
    monkeypatch.setattr(backends, "native_status",
                        lambda device_type: (True, "") if device_type == "cuda" else real(device_type))
    r = env_report.report()
    assert r["auto"]["cuda"] == {"dense": "cuda", "sparse": "triton"}
    line = [x for x in env_report.format_report(r).splitlines() if "CUDA tensors" in x][0]
    assert "dense losses cuda" in line and "sampling triton" in line


def test_a_missing_package_is_named(capsys, monkeypatch):
    monkeypatch.setattr(env_report, "PACKAGES", ("torch", "no-such-distribution-xyz"))
    assert "no-such-distribution-xyz not installed" in run_cli(capsys)


def test_usage_lists_env(capsys):
    assert cli.main([]) == 2
    assert "env" in capsys.readouterr().out
