"""TorchTitan's MoE with turbo_dist's overrides (switched on like a job config's --override.imports)
against TorchTitan's own path: "standard" all-to-all EP dispatcher and torch._grouped_mm experts.

CPU (gloo, 2 ranks, EP=2): a TorchTitan `MoE` built from its own configs (router, RoutedExperts,
GroupedExperts; expert weights sharded over EP as TorchTitan's EP sharding leaves them) runs
forward+backward; output and gradients (input, router gate, expert weights) match between the two paths.
"""
import pytest
import torch

pytest.importorskip("torchtitan.models.common.moe",
                    reason="torchtitan not installed (pip install 'turbo_dist[torchtitan]')")

from turbo_dist.testing import run_distributed  # noqa: E402

DIM, HIDDEN, NUM_EXPERTS, TOPK, SEQ = 16, 32, 4, 2, 12  # dims keep torch._grouped_mm's 16-byte strides


def _moe_config(num_local_experts, overrides=()):
    from torchtitan.config.override import OverrideConfig, apply_overrides
    from torchtitan.models.common.config_utils import (make_moe_config, make_routed_experts_config,
                                                       make_router_config)

    cfg = make_moe_config(
        num_experts=NUM_EXPERTS, load_balance_coeff=None,
        router=make_router_config(dim=DIM, num_experts=NUM_EXPERTS, gate_param_init={}, top_k=TOPK,
                                  score_func="softmax"),
        routed_experts=make_routed_experts_config(dim=DIM, hidden_dim=HIDDEN, num_experts=NUM_EXPERTS, top_k=TOPK,
                                                  param_init={}, comm_backend="standard"))
    # EP shards the experts' weights on dim 0: each rank holds (and computes) its local experts only.
    cfg.routed_experts.inner_experts.num_experts = num_local_experts
    lines = apply_overrides(OverrideConfig(imports=list(overrides)), cfg) if overrides else []
    return cfg, lines


def _fill(moe, rank, num_local):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        moe.router.gate.weight.copy_(torch.randn(moe.router.gate.weight.shape, generator=g))
        experts = moe.routed_experts.inner_experts
        for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
            p = getattr(experts, name)
            full = torch.randn((NUM_EXPERTS,) + tuple(p.shape[1:]), generator=g) / 4
            p.copy_(full[rank * num_local:(rank + 1) * num_local])


def _moe_step(rank, world_size, overrides):
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.distributed import utils as titan_dist_utils

    # Without the trainer there is no spmd_types mesh context: the DTensor backend makes TorchTitan's
    # all-to-all dispatcher take its process group from the EP mesh (ours always does).
    titan_dist_utils.set_spmd_backend("partial_dtensor")
    num_local = NUM_EXPERTS // world_size
    cfg, lines = _moe_config(num_local, overrides)
    moe = cfg.build()
    _fill(moe, rank, num_local)
    moe.routed_experts.token_dispatcher.wire_meshes(ep_mesh=init_device_mesh("cpu", (world_size,),
                                                                             mesh_dim_names=("ep",)))
    x = torch.randn(1, SEQ + rank, DIM, generator=torch.Generator().manual_seed(10 + rank)).requires_grad_(True)
    out = moe(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(20 + rank))
    (out * weight).sum().backward()
    experts = moe.routed_experts.inner_experts
    return {"out": out.detach(), "x_grad": x.grad, "gate_grad": moe.router.gate.weight.grad,
            **{name: getattr(experts, name).grad for name in ("w1_EFD", "w2_EDF", "w3_EFD")},
            "dispatcher": type(moe.routed_experts.token_dispatcher).__name__,
            "experts": type(experts).__name__, "lines": lines}


@pytest.mark.dist
def test_moe_overrides_match_torchtitan_all_to_all():
    if torch.cuda.is_available():
        pytest.skip("CPU (gloo) comparison; the GPU run is in the multi-GPU suite")
    from turbo_dist.integrations.torchtitan import OVERRIDES

    ours = run_distributed(_moe_step, 2, args=(OVERRIDES,))
    ref = run_distributed(_moe_step, 2, args=((),))
    for rank, (a, b) in enumerate(zip(ours, ref)):
        assert (a["dispatcher"], a["experts"]) == ("TurboDistTokenDispatcher", "TurboDistGroupedExperts")
        assert (b["dispatcher"], b["experts"]) == ("AllToAllTokenDispatcher", "GroupedExperts")
        assert len(a["lines"]) == 2, a["lines"]
        for key in ("out", "x_grad", "gate_grad", "w1_EFD", "w2_EDF", "w3_EFD"):
            assert a[key] is not None and a[key].abs().sum() > 0, f"rank {rank} {key} missing or zero"
            # Same rows in the same order reach the same bf16 GEMMs on CPU (bitwise equal today); the
            # tolerance only allows for fp32 sums taken in another order.
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=f"rank {rank} {key}")


def test_dispatcher_override_alone_and_ep1_local_path():
    """EP=1 (no mesh): our dispatcher reorders locally exactly like TorchTitan's (bitwise)."""
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    from turbo_dist.integrations.torchtitan import TurboDistTokenDispatcher

    ours = TurboDistTokenDispatcher.Config(num_experts=NUM_EXPERTS, top_k=TOPK).build()
    ours.wire_meshes(ep_mesh=None)
    ref = LocalTokenDispatcher.Config(num_experts=NUM_EXPERTS, top_k=TOPK).build()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SEQ, DIM, generator=g)
    scores = torch.rand(SEQ, TOPK, generator=g)
    ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=g)[:TOPK] for _ in range(SEQ)])
    counts = torch.bincount(ids.flatten(), minlength=NUM_EXPERTS)
    a_in, a_n, a_meta = ours.dispatch(x, scores, ids, counts)
    b_in, b_n, b_meta = ref.dispatch(x, scores, ids, counts)
    assert torch.equal(a_in, b_in) and torch.equal(a_n, b_n)
    assert torch.equal(ours.combine(a_in * 2, a_meta, x), ref.combine(b_in * 2, b_meta, x))


def test_grouped_experts_override_matches_torch_grouped_mm():
    """Single process: TurboDistGroupedExperts (turbo_dist.ops.grouped_gemm) vs GroupedExperts, fwd+bwd."""
    from torchtitan.config.override import OverrideConfig, apply_overrides
    from torchtitan.models.common.moe import GroupedExperts

    from turbo_dist.ops import dispatcher

    def build(overrides):
        cfg, _ = _moe_config(NUM_EXPERTS)
        if overrides:
            apply_overrides(OverrideConfig(imports=["turbo_dist.integrations.torchtitan.grouped_experts"]), cfg)
        experts = cfg.routed_experts.inner_experts.build()
        _fill_experts(experts)
        return experts

    def _fill_experts(experts):
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
                getattr(experts, name).copy_(torch.randn(getattr(experts, name).shape, generator=g) / 4)

    counts = torch.tensor([3, 0, 5, 4])
    x = torch.randn(int(counts.sum()), DIM, generator=torch.Generator().manual_seed(1))
    results = []
    for overrides in (True, False):
        experts = build(overrides)
        assert isinstance(experts, GroupedExperts)
        xi = x.clone().requires_grad_(True)
        y = experts(xi, counts)
        y.square().sum().backward()
        if overrides:  # the override really ran turbo_dist.ops.grouped_gemm (CPU: its "loop" backend)
            expected = ("torch", "triton") if torch.cuda.is_available() else ("loop",)
            assert dispatcher.last_backend("grouped_gemm") in expected, dispatcher.last_backend("grouped_gemm")
        results.append([y.detach(), xi.grad] + [getattr(experts, n).grad for n in ("w1_EFD", "w2_EDF", "w3_EFD")])
        assert type(experts).__name__ == ("TurboDistGroupedExperts" if overrides else "GroupedExperts")
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # bf16 GEMMs, possibly different kernels


def test_override_options_are_checked():
    from torchtitan.config.override import OverrideConfig, apply_overrides

    cfg, _ = _moe_config(NUM_EXPERTS)
    with pytest.raises(TypeError):  # a kwarg the factory does not take: TorchTitan's binding error
        apply_overrides(OverrideConfig(imports=[("turbo_dist.integrations.torchtitan.moe_token_dispatcher",
                                                 {"bogus": 1})]), cfg)
    cfg, _ = _moe_config(NUM_EXPERTS)
    apply_overrides(OverrideConfig(imports=[("turbo_dist.integrations.torchtitan.moe_token_dispatcher",
                                             {"transport": "rdma"})]), cfg)
    with pytest.raises(ValueError, match="transport"):
        cfg.routed_experts.token_dispatcher.build()
