"""The names other code builds on are exported at the top level (the issues' public contracts)."""

import torch

import distill_ops


def test_top_level_names():
    for name in ("kd_loss", "KDLoss", "sparse_kd_loss", "teacher_topk", "teacher_sample",
                 "SparseTargets"):
        assert name in distill_ops.__all__ and hasattr(distill_ops, name), name


def test_topk_then_sparse_loss_round_trip():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 40, generator=g)
    s = torch.randn(2, 3, 40, generator=g, requires_grad=True)
    targets = distill_ops.teacher_topk(t, 40, backend="torch")
    # k = V with renormalisation is the dense forward KL
    loss = distill_ops.sparse_kd_loss(s, targets, backend="torch")
    dense = distill_ops.kd_loss(s, t, backend="torch")
    torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-6)
