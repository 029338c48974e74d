"""The benchmark harness's own logic, end to end on tiny CPU shapes (no timing claims)."""

import json
import os

import pytest
import torch

from bench import __main__ as bench_main
from bench import config, inputs, readme_table, report
from bench import providers as prov
from bench.measure import CpuTimer
from bench.runner import Runner

FAST = ["--device", "cpu", "--rep-s", "0.01", "--min-reps", "2", "--copy-mb", "2", "--no-progress"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run.json"
    bench_main.main(["all", "--N", "4", "--V", "64", "--k", "8", "--mode", "fwdbwd",
                     "--divergence", "forward_kl", "jsd+ce",
                     "--providers", "torch-eager", "liger", "distill_ops:torch", "distill_ops:cpu",
                     "--out", str(out)] + FAST)
    return out


def test_run_writes_every_row(result):
    doc = json.loads(result.read_text())
    assert doc["schema"] == report.SCHEMA
    assert doc["device"]["type"] == "cpu" and doc["commit"]
    assert doc["copy_bandwidth"]["gb_per_s"] > 0
    rows = doc["rows"]
    # dense: 2 cases, sparse: 1, topk: 1, sample: 1, linear: 2; four providers each, none dropped.
    assert len(rows) == 7 * 4
    by = {(r["suite"], r["divergence"], r["hard_label"], r["provider"]): r for r in rows}
    eager = by[("dense", "forward_kl", False, "torch-eager")]
    assert eager["status"] == "ok" and eager["ms_median"] > 0 and eager["bytes"] == 3 * 4 * 64 * 4
    assert eager["gb_per_s"] > 0 and eager["floor_fraction"] > 0
    ref = by[("dense", "jsd", True, "distill_ops:torch")]
    assert ref["status"] == "ok" and ref["loss_vs_eager"] < 1e-4
    liger = by[("dense", "forward_kl", False, "liger")]
    assert liger["status"] == "unavailable" and liger["error"]
    native = by[("dense", "forward_kl", False, "distill_ops:cpu")]
    assert native["status"] in ("ok", "unavailable")
    assert by[("sparse", "forward_kl", False, "torch-eager")]["status"] == "ok"
    assert by[("topk", "topk", False, "torch-eager")]["status"] == "ok"
    assert by[("sample", "sample", False, "torch-eager")]["status"] == "ok"
    assert by[("sample", "sample", False, "distill_ops:torch")]["status"] == "ok"
    lin = by[("linear", "jsd", True, "distill_ops:torch")]
    assert lin["status"] == "ok" and lin["loss_vs_eager"] < 1e-4 and lin["tflop_per_s"] > 0
    assert lin["H"] == 256 and lin["floor_fraction"] is None
    for r in rows:
        assert r["status"] in ("ok", "unavailable", "missing", "error")
        if r["status"] != "ok":
            assert r["error"], r


def test_bwd_rows_claim_no_floor_or_throughput(tmp_path):
    """A fused provider's gradient is made in its forward: its bwd row times a scale, eager's the
    whole backward. No bytes, GB/s, floor fraction or TFLOP/s for either (the fused rows claimed
    thousands of percent of the floor)."""
    rows = []
    for suite in ("dense", "linear"):
        out = tmp_path / f"{suite}.json"
        bench_main.main([suite, "--N", "4", "--V", "64", "--mode", "bwd", "--divergence",
                         "forward_kl", "--providers", "torch-eager", "distill_ops:torch",
                         "--out", str(out)] + FAST)
        rows += json.loads(out.read_text())["rows"]
    assert {r["suite"] for r in rows} == {"dense", "linear"} and len(rows) >= 4
    for r in rows:
        assert r["status"] == "ok" and r["ms_median"] > 0, r
        assert r["bytes"] is None and r["gb_per_s"] is None and r["floor_fraction"] is None
        assert r.get("tflop_per_s") is None


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs /proc/self/clear_refs")
def test_cpu_peak_memory_sees_a_temporary_every_call():
    """glibc reuses a freed multi-MB buffer from its heap once its mmap threshold has risen, so
    the RSS high-water mark missed it on later calls (16 MB read 16, 16, 16, 0)."""
    from bench import measure

    def step():
        torch.ones(4 << 20).sum()  # a 16 MiB temporary, freed on return

    seen = [measure.peak_extra_bytes(torch.device("cpu"), step, lambda: None) for _ in range(5)]
    assert all(b >= 15 << 20 for b in seen), [b >> 20 for b in seen]


def test_readme_table_renders_and_rewrites_only_its_section(result, tmp_path):
    table = readme_table.render([result])
    assert "| loss | dtype | N | V |" in table and "torch-eager" in table
    assert "| forward_kl | fp32 | 4 | 64 |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{readme_table.START}\nold\n{readme_table.END}\nafter\n")
    assert readme_table.update_readme(readme, table)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{readme_table.END}\nafter\n")
    assert "old" not in text and "torch-eager" in text
    readme_table.update_readme(readme, table)
    assert readme.read_text() == text  # idempotent
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not readme_table.update_readme(plain, table)
    assert plain.read_text() == "no markers\n"


def test_a_run_on_fewer_threads_is_its_own_device(result, tmp_path):
    """A CPU run with --threads below the core count is grouped apart (its own table), so that
    it never stands in for, or mixes with, the all-core rows."""
    doc = json.loads(result.read_text())
    doc["device"].update(type="cpu", name="Some CPU", cpu_count=4, torch_threads=4)
    full = tmp_path / "full.json"
    full.write_text(json.dumps(doc))
    doc["device"]["torch_threads"] = 1
    doc["date"] = "2999-01-01T00:00:00"   # newer: it must still not replace the all-core rows
    one = tmp_path / "one.json"
    one.write_text(json.dumps(doc))
    devices = {r["device"] for r in report.latest(report.load_rows([full, one]))}
    assert devices == {"Some CPU", "Some CPU (1 of 4 threads)"}
    assert "**Some CPU (1 of 4 threads)**" in readme_table.render([full, one])


def test_readme_table_marks_runs_of_uncommitted_trees(result, tmp_path):
    """A run measured with uncommitted changes says so next to its commit (the commit alone does
    not pin the code)."""
    doc = json.loads(result.read_text())
    for dirty, mark in ((True, "+uncommitted"), (False, ""), (None, "")):
        doc.update(commit="0123456789abcdef", dirty=dirty)
        path = tmp_path / f"run-{dirty}.json"
        path.write_text(json.dumps(doc))
        assert f"commit 0123456789{mark};" in readme_table.render([path])


def test_plots(result, tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plots

    written = plots.make_plots([result], tmp_path / "plots")
    assert written and all(p.exists() and p.stat().st_size > 0 for p in written)


class _Failing(prov.Provider):
    name = "failing"

    def __init__(self, message):
        self.message = message
        self.sizes = []

    def make(self, case):
        def fn(x):
            self.sizes.append(x["student"].shape[0])
            raise RuntimeError(self.message)
        return fn


def test_failures_and_oom_become_rows():
    case = config.Case("dense", "forward_kl", False, "fp32", 8, 16, "fwdbwd")
    runner = Runner(torch.device("cpu"), CpuTimer(rep_s=0.0, min_reps=1), progress=False)
    broken = _Failing("kernel exploded")
    oom = _Failing("CUDA out of memory. Tried to allocate 4.00 GiB")
    rows = runner.run([case], lambda c: [prov.get("torch-eager"), broken, oom])
    eager, err, mem = rows
    assert eager["status"] == "ok"
    assert err["status"] == "error" and "kernel exploded" in err["error"]
    assert mem["status"] == "oom" and mem["shrunk"] and mem["N"] == 2
    assert oom.sizes == [8, 4, 2]  # retried at N / 2, twice


def test_plan_presets():
    quick = config.build_plan("all", "cuda", True)
    key = [c for c in quick if not c.optional]
    assert {(c.divergence, c.n, c.v, c.dtype, c.mode) for c in key} == {
        (d, n, 128256, "bf16", "fwdbwd") for d in ("forward_kl", "jsd") for n in (8192, 256)}
    assert all(c.providers == config.DISTILL_GPU_DENSE
               for c in quick if c.suite == "dense" and c.optional)
    cpu = config.build_plan("dense", "cpu", False)
    assert [(c.divergence, c.dtype, c.n, c.v, c.mode) for c in cpu] == [
        ("forward_kl", "fp32", 512, 128256, "fwdbwd")]
    custom = config.build_plan("dense", "cuda", False, V=[32000, 64], N=[2], dtype=["fp16"],
                               mode=["fwd"], divergence=["reverse_kl+ce"])
    assert [(c.v, c.hard_label, c.dtype) for c in custom] == [(32000, True, "fp16"), (64, True, "fp16")]


@pytest.mark.parametrize("name,suite,value,refusal", [
    ("distill_ops:cuda-resident", "dense", "require", "dense-loss kernel"),
    ("distill_ops:cuda-radix", "topk", "radix", "top-k kernel"),
])
def test_forced_kernel_providers_set_their_switch_only_for_their_call(monkeypatch, name, suite,
                                                                      value, refusal):
    """distill_ops:cuda-resident (DISTILL_OPS_CUDA_RESIDENT=require) and distill_ops:cuda-radix
    (DISTILL_OPS_CUDA_TOPK=radix) set the variable the extension reads for their own call only,
    leave the environment as they found it, and refuse the other suites' rows; the GPU plans time
    them beside distill_ops:cuda."""
    p = prov.get(name)
    monkeypatch.delenv(p.ENV, raising=False)
    case = config.Case(suite, "forward_kl" if suite == "dense" else suite, False, "bf16", 2, 8,
                       "fwd", k=2)
    seen = []
    monkeypatch.setattr(prov.DistillOps, "make",
                        lambda self, c: lambda x: seen.append(os.environ.get(p.ENV)))
    p.make(case)({})
    assert seen == [value] and p.ENV not in os.environ
    with pytest.raises(prov.Unavailable, match=refusal):
        p.check(config.Case("sparse", "forward_kl", False, "fp32", 2, 8, "fwd", k=2), "cuda")
    assert name in config.default_providers(suite, "cuda")
    quick = [c for c in config.build_plan(suite, "cuda", True) if c.suite == suite]
    assert quick and any(name in (c.providers or ()) for c in quick)


def test_sanitize_driver_runs_every_op_family():
    """bench/sanitize_ops.py (the compute-sanitizer driver) through the CPU kernels: it must not
    rot unseen between GPU sessions."""
    pytest.importorskip("distill_ops._C")
    from bench import sanitize_ops

    assert sanitize_ops.main(["--device", "cpu", "--quick"]) == 0


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_liger_provider_computes_the_eager_loss(divergence):
    """The liger rows compare like with like: Liger's JSD fed as the provider feeds it gives the
    eager loss (run here under the Triton interpreter; its KL-div kernel does not run there, and
    the GPU run records loss_vs_eager for every row)."""
    pytest.importorskip("liger_kernel")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter on the CPU")
    case = config.Case("dense", divergence, False, "fp32", 6, 96, "fwd")
    x = inputs.make(case, 6, torch.device("cpu"))
    ours = prov.Liger().make(case)(x)
    eager = prov.TorchEager().make(case)(x)
    torch.testing.assert_close(ours.double(), eager.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_liger_fused_linear_provider_computes_the_eager_loss(divergence):
    """LigerFusedLinearJSD as the linear suite feeds it (beta 0 for forward KL) gives the eager
    loss on the same hidden states and lm_heads (Liger under the Triton interpreter)."""
    pytest.importorskip("liger_kernel")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter on the CPU")
    case = config.Case("linear", divergence, False, "fp32", 6, 80, "fwd", h=16)
    x = inputs.make(case, 6, torch.device("cpu"))
    ours = prov.Liger().make(case)(x)
    eager = prov.TorchEager().make(case)(x)
    torch.testing.assert_close(ours.double(), eager.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_trl_fused_linear_provider_computes_the_eager_loss(divergence):
    """TRL's own fused-linear loss as the linear suite feeds it gives the eager loss (the torch
    tiles it runs on the CPU)."""
    try:
        prov.TrlChunked()._fn()
    except prov.Unavailable as exc:
        pytest.skip(str(exc))
    case = config.Case("linear", divergence, False, "fp32", 6, 80, "fwd", h=16)
    x = inputs.make(case, 6, torch.device("cpu"))
    ours = prov.TrlChunked().make(case)(x)
    eager = prov.TorchEager().make(case)(x)
    torch.testing.assert_close(ours.double(), eager.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_torchtune_providers_compute_the_same_loss(divergence):
    """torchtune's chunked KD loss and distill_ops' drop-in for it, as the dense suite feeds them,
    give one value; for reverse KL it is the eager loss, for forward KL the eager KL plus the
    teacher's entropy (torchtune's forward loss is the cross-entropy)."""
    case = config.Case("dense", divergence, False, "fp32", 20, 96, "fwd")
    x = inputs.make(case, 20, torch.device("cpu"))
    ours = prov.DistillOpsTorchtune().make(case)(x)
    logp = torch.log_softmax(x["teacher"].double(), -1)
    entropy = -(logp.exp() * logp).sum(-1).mean() if divergence == "forward_kl" else 0.0
    eager = prov.TorchEager().make(case)(x).double() + entropy
    torch.testing.assert_close(ours.double(), eager, rtol=1e-5, atol=1e-6)
    try:
        prov.Torchtune().check(case, torch.device("cpu"))
    except prov.Unavailable as exc:
        pytest.skip(str(exc))
    theirs = prov.Torchtune().make(case)(x)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-5, atol=1e-6)


_PTXAS_LOG = """\
ptxas info    : Compiling entry function '_ZN11distill_ops4cuda10row_kernelIN3c108BFloat16EfLi0EEEvNS_9DenseArgsENS_10LossConstsIT0_EEb' for 'sm_90'
ptxas info    : Function properties for _ZN11distill_ops4cuda10row_kernelIN3c108BFloat16EfLi0EEEvNS_9DenseArgsENS_10LossConstsIT0_EEb
    40 bytes stack frame, {bf16} bytes spill stores, 52 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 40 bytes cumulative stack size, 1288 bytes smem
ptxas info    : Compiling entry function '_ZN11distill_ops4cuda10row_kernelIddLi2EEEvNS_9DenseArgsENS_10LossConstsIT0_EEb' for 'sm_90'
ptxas info    : Function properties for _ZN11distill_ops4cuda10row_kernelIddLi2EEEvNS_9DenseArgsENS_10LossConstsIT0_EEb
    0 bytes stack frame, 244 bytes spill stores, 196 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 1288 bytes smem
"""


@pytest.mark.parametrize("bf16_spill, rc", [(72, 1), (0, 0)])
def test_ptxas_spills_fails_on_a_spill_except_fp64(monkeypatch, capsys, bf16_spill, rc):
    from bench import ptxas_spills
    log = _PTXAS_LOG.format(bf16=bf16_spill).replace(
        "52 bytes spill loads", f"{52 if bf16_spill else 0} bytes spill loads")
    ks = ptxas_spills.parse(log)
    assert [(k.registers, k.spill_stores, k.fp64) for k in ks] == [(64, bf16_spill, False), (64, 244, True)]
    monkeypatch.setattr(ptxas_spills, "compile_log", lambda path, arch: log)
    assert ptxas_spills.main(["x.cu"]) == rc
    out = capsys.readouterr().out
    assert "fp64, allowed: 244 B" in out
    assert ("SPILLS: 72 B" in out) == bool(rc)


def test_ptxas_spills_reads_a_build_log(tmp_path, capsys):
    """--log: the report comes from a ninja build's output (the twin's build in CI), each nvcc
    step's own; a .cu the log never compiled, or compiled for another architecture, is an error,
    not a pass."""
    from bench import ptxas_spills
    nvcc = ("/usr/local/cuda/bin/nvcc --generate-dependencies-with-compile --dependency-output "
            "/tmp/b/{0}.o.d -O3 -c /tmp/src/csrc/cuda/{0}.cu -o /tmp/b/{0}.o -Xptxas -v")
    log = "\n".join([
        "[1/4] c++ -MMD -c /tmp/src/csrc/ops.cpp -o /tmp/b/ops.o",
        "[2/4] " + nvcc.format("a"), _PTXAS_LOG.format(bf16=0).replace("52 bytes spill loads",
                                                                       "0 bytes spill loads"),
        "[3/4] " + nvcc.format("b"), _PTXAS_LOG.format(bf16=72),
        "[4/4] c++ /tmp/b/ops.o /tmp/b/a.o /tmp/b/b.o -shared -o _C.so", ""])
    (tmp_path / "build.log").write_text(log)
    parts = ptxas_spills.split_build_log(log)
    assert sorted(parts) == ["a.cu", "b.cu"] and "-shared" not in parts["b.cu"]
    assert ptxas_spills.main(["--log", str(tmp_path / "build.log"), "x/a.cu"]) == 0
    assert ptxas_spills.main(["--log", str(tmp_path / "build.log"), "a.cu", "b.cu"]) == 1
    assert "SPILLS: 72 B" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no nvcc step for"):
        ptxas_spills.main(["--log", str(tmp_path / "build.log"), "a.cu", "c.cu"])
    with pytest.raises(SystemExit, match="no ptxas report for sm_80"):
        ptxas_spills.main(["--log", str(tmp_path / "build.log"), "--arch", "80", "a.cu"])
    with pytest.raises(SystemExit, match="no build log at"):
        ptxas_spills.main(["--log", str(tmp_path / "other.log"), "a.cu"])


# ----------------------------------------------------------------------------- every divergence

DIV_PROVIDERS = ["torch-eager", "distill_ops:cpu", "distill_ops:torch", "liger"]


def test_bench_divergences_are_the_librarys():
    """The dense and sparse suites offer every divergence distill_ops has (config writes them out
    so that planning does not import distill_ops)."""
    import distill_ops

    assert set(config.DIVERGENCES) == set(distill_ops.DIVERGENCES)
    assert set(config.SPARSE_DIVERGENCES) == set(distill_ops.DIVERGENCES)
    assert set(prov.EAGER) == set(config.DIVERGENCES)


@pytest.fixture(scope="module")
def every_divergence(tmp_path_factory):
    """One dense and one sparse run of the harness over every divergence (tiny CPU shapes;
    torch.compile is left out, as in the rest of this file: its compilations cost minutes)."""
    docs = {}
    for suite, divs in (("dense", config.DIVERGENCES), ("sparse", config.SPARSE_DIVERGENCES)):
        out = tmp_path_factory.mktemp("bench") / f"{suite}.json"
        docs[suite] = bench_main.main([suite, "--N", "4", "--V", "64", "--k", "8", "--mode",
                                       "fwdbwd", "--divergence", *divs,
                                       "--providers", *DIV_PROVIDERS, "--out", str(out)] + FAST)
    return docs


@pytest.mark.parametrize("suite", ["dense", "sparse"])
def test_every_divergence_runs_through_the_harness(every_divergence, suite):
    rows = every_divergence[suite]["rows"]
    divs = config.DIVERGENCES if suite == "dense" else config.SPARSE_DIVERGENCES
    by = {(r["divergence"], r["provider"]): r for r in rows}
    assert set(by) == {(d, p) for d in divs for p in DIV_PROVIDERS}  # nothing dropped
    for div in divs:
        for name in ("torch-eager", "distill_ops:cpu", "distill_ops:torch"):
            row = by[(div, name)]
            if name == "distill_ops:cpu" and row["status"] == "unavailable":
                continue  # no CPU extension built
            assert row["status"] == "ok", row
            assert row["loss"] is not None and row["loss"] >= 0 and row["ms_median"] > 0
            assert row["loss_vs_eager"] < 1e-4, row
        liger = by[(div, "liger")]
        assert liger["status"] == "unavailable" and liger["error"]


@pytest.mark.parametrize("temperature", [prov.TEMPERATURE, 2.0])
@pytest.mark.parametrize("div", [d for d in config.DIVERGENCES] + ["jsd+ce", "skew_reverse_kl+ce"])
def test_dense_eager_matches_distill_ops_torch(div, temperature):
    """Each eager baseline is the library's function (value and gradient): kd_loss with
    backend="torch" on the same inputs, at the harness's beta / alpha and at a temperature that
    shows the tau^2 factor. The provider itself at the harness's temperature; the eager function
    at any other."""
    import distill_ops

    base, hard = (div[:-3], True) if div.endswith("+ce") else (div, False)
    case = config.Case("dense", base, hard, "fp32", 6, 96, "fwd")
    x = inputs.make(case, 6, torch.device("cpu"))
    s1 = x["student"].clone().requires_grad_(True)
    s2 = x["student"].clone().requires_grad_(True)
    if temperature == prov.TEMPERATURE:
        eager = prov.TorchEager().make(case)({**x, "student": s1})
    else:
        eager = prov.EAGER[base](s1, x["teacher"], temperature=temperature)
        if hard:
            eager = eager + prov.HARD_WEIGHT * torch.nn.functional.cross_entropy(s1, x["labels"])
    kw = dict(divergence=base, beta=prov.JSD_BETA, alpha=prov.SKEW_ALPHA,
              temperature=temperature, backend="torch")
    if hard:
        kw.update(labels=x["labels"], hard_weight=prov.HARD_WEIGHT)
    ref = distill_ops.kd_loss(s2, x["teacher"], **kw)
    torch.testing.assert_close(eager.double(), ref.double(), rtol=1e-5, atol=1e-6)
    eager.backward()
    ref.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [prov.TEMPERATURE, 2.0])
@pytest.mark.parametrize("div", config.SPARSE_DIVERGENCES)
def test_sparse_eager_matches_distill_ops_torch(div, temperature):
    """Each sparse eager baseline is sparse_kd_loss with backend="torch" (forward KL against the
    full-vocabulary student; the others on the target support), value and gradient."""
    import distill_ops

    case = config.Case("sparse", div, False, "fp32", 6, 96, "fwd", k=8)
    x = inputs.make(case, 6, torch.device("cpu"))
    s1 = x["student"].clone().requires_grad_(True)
    s2 = x["student"].clone().requires_grad_(True)
    if temperature == prov.TEMPERATURE:
        eager = prov.TorchEager().make(case)({**x, "student": s1})
    elif prov.sparse_uses_full_vocab(div):
        eager = prov.eager_sparse_kd(s1, x["ids"], x["logw"], temperature=temperature)
    else:
        eager = prov.eager_sparse_support(s1, x["ids"], x["logw"], div, temperature=temperature)
    ref = distill_ops.sparse_kd_loss(s2, x["ids"], x["logw"], divergence=div, beta=prov.JSD_BETA,
                                     alpha=prov.SKEW_ALPHA, temperature=temperature,
                                     backend="torch")
    torch.testing.assert_close(eager.double(), ref.double(), rtol=1e-5, atol=1e-6)
    eager.backward()
    ref.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("div", ["skew_forward_kl", "skew_reverse_kl"])
def test_liger_reports_no_skew_kl(div):
    """Liger-Kernel has no skew KL: on a GPU too the row says so (before importing Liger)."""
    case = config.Case("dense", div, False, "bf16", 8, 64, "fwdbwd")
    with pytest.raises(prov.Unavailable, match="no skew KL"):
        prov.Liger().check(case, torch.device("cuda"))


def test_floor_bytes_per_divergence():
    """Dense: every divergence must move both full rows (and write the gradient), the same bytes.
    Sparse: forward KL reads the whole student row; the support divergences only its k logits at
    the ids, and all of them write the dense gradient."""
    n, v, k = 4, 64, 8
    dense = {d: inputs.floor_bytes(config.Case("dense", d, False, "bf16", n, v, "fwdbwd"), n)
             for d in config.DIVERGENCES}
    assert set(dense.values()) == {3 * n * v * 2}
    targets = n * k * 12
    for div in config.SPARSE_DIVERGENCES:
        student = n * v * 2 if div == "forward_kl" else n * k * 2
        for mode, want in (("fwd", student + targets), ("fwdbwd", student + targets + n * v * 2),
                           ("bwd", n * v * 2)):
            case = config.Case("sparse", div, False, "bf16", n, v, mode, k=k)
            assert inputs.floor_bytes(case, n) == want, (div, mode)


def test_plan_divergence_defaults_and_choices():
    """Nothing asked: the same divergences as before (the GPU plan does not grow). Asked: every
    library divergence, dense and sparse; unknown names and a sparse '+ce' stop the run."""
    full = config.build_plan("all", "cuda", False)
    assert {c.divergence + ("+ce" if c.hard_label else "") for c in full
            if c.suite == "dense"} == set(config.DENSE_CASES)
    assert {c.divergence for c in full if c.suite == "sparse"} == {"forward_kl"}
    assert {c.divergence for c in config.build_plan("sparse", "cpu", False)} == {"forward_kl"}
    quick = config.build_plan("all", "cuda", True)
    assert {c.divergence for c in quick if c.suite == "sparse"} == {"forward_kl"}
    for suite in ("dense", "sparse"):
        plan = config.build_plan(suite, "cpu", False, divergence=list(config.DIVERGENCES))
        assert [c.divergence for c in plan] == list(config.DIVERGENCES)
    with pytest.raises(SystemExit, match="unknown divergence"):
        config.build_plan("dense", "cpu", False, divergence=["skew_kl"])
    with pytest.raises(SystemExit, match="no hard-label case"):
        config.build_plan("sparse", "cpu", False, divergence=["jsd+ce"])
    mixed = config.build_plan("all", "cpu", False, divergence=["skew_reverse_kl", "jsd+ce"])
    assert {c.divergence for c in mixed if c.suite == "sparse"} == {"skew_reverse_kl"}
    ce_only = config.build_plan("all", "cpu", False, divergence=["forward_kl+ce"])
    assert {c.divergence for c in ce_only if c.suite == "sparse"} == {"forward_kl"}


@pytest.fixture(scope="module")
def trainer_peer_rows(tmp_path_factory):
    """bench.trainer_step on the CPU, tiny models: eager, torch.compile of it, Liger-Kernel."""
    from bench import trainer_step

    out = tmp_path_factory.mktemp("trainer_peers") / "trainer.json"
    trainer_step.main(["--device", "cpu", "--shape", "tiny", "--batch", "2", "--seq", "16",
                       "--warmup", "1", "--steps", "1", "--providers", "eager", "compile",
                       "liger", "--out", str(out)])
    return {r["provider"]: r for r in json.loads(out.read_text())["rows"]}


def test_trainer_compile_row_matches_eager(trainer_peer_rows):
    """`compile` is eager's loss function under torch.compile: same first loss (1e-5 relative),
    the same fields as the other providers, and the compilation in first_call_s, not the steps."""
    eager, comp = trainer_peer_rows["eager"], trainer_peer_rows["compile"]
    assert eager["status"] == "ok" and comp["status"] == "ok", comp.get("error")
    a, b = eager["first_loss"], comp["first_loss"]
    assert a > 0 and abs(a - b) <= 1e-5 * a
    assert comp["loss_vs_eager"] <= 1e-5
    for key in ("step_ms", "tokens_per_s", "peak_step_extra_gb", "first_loss", "last_loss",
                "first_call_s", "teacher_params", "student_params"):
        assert key in comp, key
    assert comp["first_call_s"] > 0 and comp["tokens_per_s"] > 0


def test_trainer_liger_row_unavailable_on_cpu(trainer_peer_rows):
    """Liger-Kernel is Triton, GPUs only: on the CPU its row is kept, marked unavailable with the
    reason, and the providers after it still ran (the run did not stop)."""
    row = trainer_peer_rows["liger"]
    assert row["status"] == "unavailable"
    assert "GPU" in row["error"]
    assert list(trainer_peer_rows) == ["eager", "compile", "liger"]


def test_trainer_liger_without_the_package_is_unavailable(monkeypatch):
    """Where liger_kernel does not import (a GPU machine without it), the reason is the import
    error; checked here with the module blocked, the device only named."""
    import sys

    from bench import trainer_step

    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(prov.Unavailable, match="liger_kernel is not importable"):
        trainer_step.make_loss("liger", torch.device("cuda"))


# ----------------------------------------------------------------------------- agreement checks

def _agreement(rows, suite, provider, divergence=None):
    return next(r for r in rows if r["suite"] == suite and r["provider"] == provider
                and (divergence is None or r["divergence"] == divergence))


def test_rows_record_which_agreement_checks_were_made(result):
    """Each measured row says what was compared with the reference and its worst error: loss and
    gradient (fwdbwd), top-k ids and values; the sampling rows of torch.multinomial say that
    nothing is comparable; the reference rows say they are the reference."""
    from bench import agreement

    rows = json.loads(result.read_text())["rows"]
    for suite in ("dense", "sparse", "linear"):
        rec = _agreement(rows, suite, "distill_ops:torch", "forward_kl")["agreement"]
        assert rec["against"] == "torch-eager" and set(rec["checks"]) == {"loss", "grad"}, rec
        assert rec["checks"]["grad"]["error"] < 1e-5 and rec["checks"]["grad"]["tol"] == 5e-4
        assert rec["failed"] == [] and rec["unchecked"] == []
        assert _agreement(rows, suite, "torch-eager")["agreement"]["reference"]
    topk = _agreement(rows, "topk", "distill_ops:torch")["agreement"]
    assert set(topk["checks"]) == {"ids", "values"} and not topk["failed"], topk
    eager_sample = _agreement(rows, "sample", "torch-eager")
    assert not eager_sample["agreement"]["checks"]
    assert "not comparable" in eager_sample["agreement"]["unchecked"][0]
    assert agreement.state(eager_sample) == "unchecked"
    assert _agreement(rows, "sample", "distill_ops:torch")["agreement"]["reference"]
    native = _agreement(rows, "sample", "distill_ops:cpu")
    if native["status"] == "ok":   # the C++ sampler draws the reference's ids from the same seed
        assert native["agreement"]["checks"]["ids"]["error"] == 0, native["agreement"]
        assert agreement.state(native) == "checked"
    json.dumps(rows, allow_nan=False)   # floats only: no tensor, no NaN kept in a row


class _WrongGradient(prov.Provider):
    """The eager loss's value with 1.5 times its gradient: only a gradient check sees it."""

    name = "wrong-gradient"

    def make(self, case):
        eager = prov.TorchEager().make(case)

        def fn(x):
            loss = eager(x)
            return loss + 0.5 * (loss - loss.detach())
        return fn


class _LiveTensorTimer(CpuTimer):
    """A CpuTimer that counts the live N x V tensors when the timing starts."""

    def __init__(self, shape):
        super().__init__(rep_s=0.0, min_reps=1)
        self.shape, self.live = shape, []

    def time(self, step, reset):
        import gc

        reset()
        gc.collect()
        self.live.append(sum(1 for o in gc.get_objects()
                             if issubclass(type(o), torch.Tensor) and tuple(o.shape) == self.shape))
        return super().time(step, reset)


def test_a_wrong_gradient_is_flagged_and_compared_outside_the_timing():
    """A provider with the right loss and a wrong gradient: its row is measured (status ok), its
    gradient check fails and the summary says so; the comparison leaves no N x V tensor alive
    when the timing starts (only the rotated inputs)."""
    from bench import agreement

    n, v = 8, 1000
    case = config.Case("dense", "forward_kl", False, "fp32", n, v, "fwdbwd")
    timer = _LiveTensorTimer((n, v))
    runner = Runner(torch.device("cpu"), timer, progress=False)
    eager, wrong = runner.run([case], lambda c: [prov.get("torch-eager"), _WrongGradient()])
    rec = wrong["agreement"]
    assert wrong["status"] == "ok" and rec["failed"] == ["grad"], rec
    assert abs(rec["checks"]["grad"]["error"] - 0.5) < 1e-3
    assert rec["checks"]["loss"]["error"] < 1e-6 and "loss" not in rec["failed"]
    assert agreement.state(wrong) == "failed" and agreement.state(eager) == "reference"
    text = report.summary({"rows": [eager, wrong], "device": {"name": "cpu"},
                           "versions": {}, "commit": "x"})
    assert "grad differs from torch-eager by 5.0e-01" in text
    assert timer.live == [2 * eager["input_copies"], 2 * wrong["input_copies"]]


def test_topk_check_allows_ties_and_catches_wrong_ids_and_values():
    """Top-k ids compare as sets allowing ties (eager's log-probabilities at the ids), values at
    the provider's own ids."""
    from bench import agreement

    teacher = torch.tensor([[5.0, 5.0, 5.0, 1.0, 0.0, -1.0]] * 3)
    case = config.Case("topk", "topk", False, "fp32", 3, 6, "fwd", k=2)
    log_p = torch.log_softmax(teacher, -1)

    def check(ids):
        ids = torch.tensor([ids] * 3)
        return agreement.check_first_call(case, "x", {"teacher": teacher},
                                          (ids, log_p.gather(-1, ids)), {})

    tied = check([2, 1])        # eager picks 0 and 1: another choice among equals
    assert not tied["failed"] and tied["checks"]["ids"]["error"] == 0, tied
    wrong = check([0, 3])
    assert wrong["failed"] == ["ids"], wrong
    ids = torch.tensor([[0, 1]] * 3)
    off = agreement.check_first_call(case, "x", {"teacher": teacher},
                                     (ids, log_p.gather(-1, ids) + 1e-2), {})
    assert off["failed"] == ["values"], off


@pytest.mark.parametrize("dtype,divergence,tol", [("fp32", "forward_kl", 5e-4),
                                                  ("bf16", "forward_kl", 1e-2),
                                                  ("fp32", "jsd", 5e-4 + 1e-2)])
def test_gradient_tolerance_depends_on_dtype_and_divergence(dtype, divergence, tol):
    from bench import agreement

    case = config.Case("dense", divergence, False, dtype, 2, 8, "fwdbwd")
    assert agreement._grad_tol(case) == pytest.approx(tol)


def test_gradient_reference_is_chunked_over_rows(monkeypatch):
    """The eager gradient is recomputed a few rows at a time (bounded temporaries) and still
    matches the whole-batch gradient, shared weights (the linear suite's lm_head) included."""
    from bench import agreement

    monkeypatch.setattr(agreement, "REFERENCE_CHUNK_ELEMENTS", 3 * 80)   # 3 rows of V = 80
    for suite in ("dense", "linear"):
        case = config.Case(suite, "jsd", True, "fp32", 7, 80, "fwdbwd", h=16)
        x = inputs.make(case, 7, torch.device("cpu"))
        keys = ("hs", "ws") if suite == "linear" else ("student",)
        for key in keys:
            x[key].requires_grad_(True)
        prov.TorchEager().make(case)(x).backward()
        rec = agreement.check_first_call(case, "p", x, None, {k: x[k].grad for k in keys})
        assert rec["checks"]["grad"]["error"] < 1e-6, (suite, rec)


# ----------------------------------------------------------------------------- copy bandwidth

def test_copy_bandwidth_probed_before_after_and_into_fresh_memory(result):
    """The probe runs before and after the rows (both kept, with their spread) and once into a
    fresh destination; floor fractions use the warm probe before the rows."""
    doc = json.loads(result.read_text())
    bw = doc["copy_bandwidth"]
    for key in ("before", "after", "fresh"):
        assert bw[key]["gb_per_s"] > 0 and bw[key]["bytes"] == 2 * 2 ** 20, key
    assert bw["fresh"]["destination"].startswith("fresh")
    assert bw["floor_uses"] == "before" and bw["gb_per_s"] == bw["before"]["gb_per_s"]
    lo, hi = sorted((bw["before"]["gb_per_s"], bw["after"]["gb_per_s"]))
    assert bw["spread"] == pytest.approx({"min_gb_per_s": lo, "max_gb_per_s": hi,
                                          "relative": (hi - lo) / lo})
    row = next(r for r in doc["rows"] if r.get("floor_fraction"))
    assert row["floor_fraction"] == pytest.approx(row["gb_per_s"] / bw["before"]["gb_per_s"])


def test_fresh_copy_probe_allocates_a_new_destination_for_every_copy(monkeypatch):
    from bench import measure

    made = []
    real = measure._new_destination
    monkeypatch.setattr(measure, "_new_destination", lambda like: made.append(1) or real(like))
    timer = CpuTimer(warmup=1, rep_s=0.0, min_reps=3, max_reps=3)
    probe = measure.copy_bandwidth(torch.device("cpu"), timer, 1 << 16, fresh=True)
    assert len(made) == 1 + 3 and probe["reps"] == 3   # one before each copy, warm-up included
    measure.copy_bandwidth(torch.device("cpu"), timer, 1 << 16)
    assert len(made) == 4                               # the warm probe reuses its buffer


# ----------------------------------------------------------------------------- CPU rotation

def _fake_cache(root, cpu, index, level, size, kind="Unified", shared="0-1"):
    d = root / f"cpu{cpu}" / "cache" / f"index{index}"
    d.mkdir(parents=True)
    for name, value in (("level", level), ("size", size), ("type", kind),
                        ("shared_cpu_list", shared)):
        (d / name).write_text(f"{value}\n")


def test_llc_from_sysfs(tmp_path):
    """The highest level's size, each shared instance once, instances summed; None without
    sysfs (the caller then takes the documented default)."""
    from bench import measure

    for cpu in (0, 1):
        _fake_cache(tmp_path, cpu, 0, 1, "32K", "Data", shared=str(cpu))
        _fake_cache(tmp_path, cpu, 1, 1, "32K", "Instruction", shared=str(cpu))
        _fake_cache(tmp_path, cpu, 2, 2, "512K", shared=str(cpu))
        _fake_cache(tmp_path, cpu, 3, 3, "32768K", shared="0-1")
    assert measure.llc_bytes_from_sysfs(tmp_path) == 32 * 2 ** 20
    _fake_cache(tmp_path, 2, 3, 3, "16M", shared="2-3")   # a second L3 instance
    assert measure.llc_bytes_from_sysfs(tmp_path) == 48 * 2 ** 20
    assert measure.llc_bytes_from_sysfs(tmp_path / "absent") is None
    assert measure.rotation_cache_bytes(torch.device("cpu")) > 0


def test_cpu_inputs_rotate_past_the_last_level_cache(monkeypatch):
    """On the CPU a set smaller than the LLC is rotated among copies that together exceed twice
    it (16 MB teachers sat in a 32 MiB L3 before), within the byte cap."""
    from bench import measure

    monkeypatch.setattr(measure, "llc_bytes_from_sysfs", lambda root=None: 2 ** 20)
    case = config.Case("topk", "topk", False, "fp32", 4, 16384, "fwd", k=8)   # 256 KiB a set
    runner = Runner(torch.device("cpu"), CpuTimer(rep_s=0.0, min_reps=1), progress=False)
    (row,) = runner.run([case], lambda c: [prov.get("torch-eager")])
    assert row["status"] == "ok" and row["input_copies"] == 8
    big = config.Case("topk", "topk", False, "fp32", 1024, 16384, "fwd", k=8)   # 64 MiB a set
    assert inputs.copies_for_cache(big, 1024, 2 ** 31) == inputs.ROTATION_CAP_BYTES // (64 << 20)


# ----------------------------------------------------------------------------- README table

def test_readme_table_marks_unchecked_and_failed_cells(result, tmp_path):
    """Cells whose agreement was not checked (old files have no record) carry a mark and a
    legend line, as do failed checks; checked cells and the reference's carry none."""
    doc = json.loads(result.read_text())
    table = readme_table.render([result])
    dense = next(line for line in table.splitlines() if line.startswith("| forward_kl | fp32"))
    assert "†" not in dense and "✗" not in dense
    old = json.loads(json.dumps(doc))
    for row in old["rows"]:
        row.pop("agreement")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    lines = readme_table.render([path]).splitlines()
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    head = cells(next(line for line in lines if line.startswith("| loss |")))
    dense = cells(next(line for line in lines if line.startswith("| forward_kl | fp32")))
    assert "†" in dense[head.index("distill_ops:torch")]
    assert "†" not in dense[head.index("torch-eager")]
    assert any(line.startswith("Unmarked cells agree with torch-eager") and "† not" in line
               for line in lines)
    for row in doc["rows"]:
        if row["provider"] == "distill_ops:torch" and row["suite"] == "dense":
            row["agreement"]["failed"] = ["grad"]
    path.write_text(json.dumps(doc))
    assert "✗" in readme_table.render([path])


def test_readme_table_header_shows_the_bandwidth_of_every_run_in_the_group(result, tmp_path):
    """A group's cells can come from several files, each cell's floor fraction from its own
    file's copy bandwidth: the header shows the range then, one value otherwise."""
    doc = json.loads(result.read_text())
    doc["rows"] = [r for r in doc["rows"] if r["suite"] == "dense"]
    paths = []
    for i, (gb, n) in enumerate(((26.2, 4), (39.4, 8))):
        doc["copy_bandwidth"]["gb_per_s"] = gb
        doc["date"] = f"2026-12-0{i + 1}T00:00:00+00:00"
        for row in doc["rows"]:
            row["N"] = row["N_requested"] = n
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(doc))
    assert "copy bandwidth 26-39 GB/s (by run" in readme_table.render(paths)
    assert "copy bandwidth 39 GB/s)" in readme_table.render(paths[1:])


def test_a_check_that_breaks_leaves_the_row_measured(monkeypatch):
    """The check's own memory is not in the row's N estimate: a check that fails (out of
    memory, say) must neither fail nor shrink the row, only say it did not check."""
    from bench import agreement

    def broken(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(agreement, "check_first_call", broken)
    case = config.Case("dense", "forward_kl", False, "fp32", 8, 16, "fwdbwd")
    runner = Runner(torch.device("cpu"), CpuTimer(rep_s=0.0, min_reps=1), progress=False)
    (row,) = runner.run([case], lambda c: [prov.get("distill_ops:torch")])
    assert row["status"] == "ok" and row["N"] == 8 and not row["shrunk"]
    assert "out of memory" in row["agreement"]["unchecked"][0]
    assert agreement.state(row) == "unchecked"


def test_a_nan_in_any_chunk_fails_the_check():
    """A NaN in a later chunk is not lost to Python's max (which keeps the first operand)."""
    from bench import agreement

    ratio = agreement._MaxRatio()
    ratio.add(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
    ratio.add(torch.tensor([float("nan")]), torch.tensor([1.0]))
    record = agreement.new_record("torch-eager")
    agreement.add_check(record, "grad", agreement._worst(0.0, ratio.value()), 1e-2)
    assert record["failed"] == ["grad"] and record["checks"]["grad"]["error"] == float("inf")
