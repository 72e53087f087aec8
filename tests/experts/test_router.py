"""MoE building blocks: router statistics and capacity, and all-to-all dispatch against a local reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning_par.models.blocks import MLP

from lightning_par.experts.dispatch import moe_forward
from lightning_par.experts.layer import MoE
from lightning_par.experts.router import Routing, TopKRouter, check_moe
from tests.harness import run_distributed

E, C, H, T = 4, 16, 32, 8


def _experts(seed: int = 0) -> MoE:
    g = torch.Generator().manual_seed(seed)
    moe = MoE(C, E, lambda: MLP(C, H, bias=True, dropout=0.0))
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return moe


def _reference(x: torch.Tensor, routing: Routing, moe: MoE) -> torch.Tensor:
    """Token by token, choice by choice, with plain functional ops: what the dispatch must compute."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(routing.expert_index.shape[1]):
            if not routing.keep[n, j]:
                continue
            ex = moe.experts[str(int(routing.expert_index[n, j]))]
            h = F.gelu(F.linear(x[n], ex.fc.weight, ex.fc.bias), approximate="tanh")
            out[n] = out[n] + routing.weights[n, j] * F.linear(h, ex.proj.weight, ex.proj.bias)
    return out


def _routing(n: int, seed: int) -> Routing:
    """Uneven loads; expert 3 receives no token at all; some assignments dropped."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, 3, (n, 2), generator=g)
    index[:, 1] = (index[:, 0] + 1) % 3
    weights = torch.rand(n, 2, generator=g)
    keep = torch.rand(n, 2, generator=g) > 0.2
    z = torch.zeros(())
    return Routing(index, weights, keep, z, z, torch.zeros(E), 1)


def test_router_statistics_and_capacity():
    torch.manual_seed(0)
    router = TopKRouter(C, E, top_k=2)
    x = torch.randn(4 * T, C)
    r = router(x, T)
    assert float(r.load.sum()) == 4 * T * 2  # dropless: every token's k choices are kept
    assert r.num_sequences == 4 and float(r.dropped_fraction) == 0.0
    # A perfectly uniform router (all logits equal): P_e = 1/E, so E * sum_e f_e / E = sum_e f_e = 1.
    with torch.no_grad():
        router.gate.weight.zero_()
    r = router(x, T)
    assert float(r.aux_loss.detach()) == pytest.approx(1.0)
    assert float(r.z_loss.detach()) == pytest.approx(torch.log(torch.tensor(float(E))).item() ** 2)
    # Capacity 1.0: ceil(1.0 * T * k / E) = 4 assignments per expert per sequence; first choices first.
    capped = TopKRouter(C, E, top_k=2, capacity_factor=1.0)
    with torch.no_grad():
        capped.gate.weight.copy_(router.gate.weight)
        capped.gate.weight[0] += 1.0  # expert 0 is everybody's first choice
    r = capped(torch.randn(4 * T, C).abs(), T)
    for s in range(4):
        rows = slice(s * T, (s + 1) * T)
        for e in range(E):
            assert int((r.expert_index[rows][r.keep[rows]] == e).sum()) <= 4
        first = r.keep[rows][:, 0] & (r.expert_index[rows][:, 0] == 0)
        assert int(first.sum()) == 4  # the first 4 tokens of the sequence kept their first choice
        assert bool(first[:4].all())
    assert 0 < float(r.dropped_fraction) < 1


def test_bad_moe_settings():
    with pytest.raises(ValueError, match=r"moe_top_k=3 is not valid: it must be between 1 and num_experts=2"):
        check_moe(2, 3, None)
    with pytest.raises(ValueError, match=r"moe_capacity_factor=0 is not valid"):
        check_moe(4, 2, 0)
    with pytest.raises(ValueError, match=r"expert_parallel_size=3 does not divide num_experts=4"):
        check_moe(4, 2, None, 3)


def test_local_dispatch_matches_reference():
    ex = _experts()
    x = torch.randn(12, C, requires_grad=True)
    routing = _routing(12, 1)
    got = moe_forward(x, routing, ex._run_experts, E, None)
    torch.testing.assert_close(got, _reference(x, routing, ex), rtol=1e-5, atol=1e-6)


def _ep2(rank: int, world: int) -> dict:
    import torch.distributed as dist

    local = _experts()
    local.shard_experts(dist.group.WORLD, rank, world)
    assert sorted(local.experts, key=int) == [str(rank * 2), str(rank * 2 + 1)]  # global indices
    g = torch.Generator().manual_seed(10 + rank)
    n = 10 + 4 * rank  # ranks hold different numbers of tokens
    x = torch.randn(n, C, generator=g, requires_grad=True)
    routing = _routing(n, 20 + rank)
    out = moe_forward(x, routing, local._run_experts, E, local.group)
    (out * torch.arange(out.numel()).view_as(out).float().sin()).sum().backward()
    return {
        "x": x.detach(),
        "out": out.detach(),
        "grad_x": x.grad,
        "routing": routing,
        "grads": {k: p.grad for k, p in local.experts.named_parameters()},
    }


def test_all_to_all_dispatch_ep2_matches_local_reference():
    results = run_distributed(_ep2, 2)
    full = _experts()
    for r in results:
        x = r["x"].clone().requires_grad_(True)
        ref = _reference(x, r["routing"], full)
        torch.testing.assert_close(r["out"], ref, rtol=1e-5, atol=1e-6)
        (ref * torch.arange(ref.numel()).view_as(ref).float().sin()).sum().backward()
        torch.testing.assert_close(r["grad_x"], x.grad, rtol=1e-5, atol=1e-6)
    # Expert weight gradients: each rank's experts got the contributions of both ranks' tokens.
    for p in full.parameters():
        p.grad = None
    for r in results:
        x = r["x"].clone()
        ref = _reference(x, r["routing"], full)
        (ref * torch.arange(ref.numel()).view_as(ref).float().sin()).sum().backward()
    got = {**results[0]["grads"], **results[1]["grads"]}
    for name, p in full.experts.named_parameters():
        if name.startswith("3."):
            assert p.grad is None and not got[name].any()  # expert 3 received no token: zero gradient
            continue
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
