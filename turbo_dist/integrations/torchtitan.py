"""TorchTitan integration: turbo_dist.moe for MoE token dispatch/combine, turbo_dist.ops.grouped_gemm for experts.

TorchTitan swaps components through registered config overrides (`torchtitan.config.override`), switched
on from the job config; importing this module registers two of them and changes nothing else:

    --override.imports turbo_dist.integrations.torchtitan.moe_token_dispatcher
    --override.imports turbo_dist.integrations.torchtitan.grouped_experts
    # with options: 'turbo_dist.integrations.torchtitan.moe_token_dispatcher={"transport": "collective"}'

or in a Python job config: `OverrideConfig(imports=["turbo_dist.integrations.torchtitan.moe_token_dispatcher",
"turbo_dist.integrations.torchtitan.grouped_experts"])`. TorchTitan logs every node it replaces.

- `moe_token_dispatcher` replaces every `AllToAllTokenDispatcher.Config` (the "standard" EP backend) with
  `TurboDistTokenDispatcher.Config`: tokens go to their experts' ranks with `turbo_dist.moe.dispatch`
  (one send per token and destination rank, DeepEP layout) and come back with `turbo_dist.moe.combine`;
  the routing scores are applied to the expert outputs before the combine, in fp32, as TorchTitan does.
  With EP=1 (no EP mesh) it reorders locally exactly like TorchTitan's LocalTokenDispatcher.
- `grouped_experts` replaces every `GroupedExperts.Config` with `TurboDistGroupedExperts.Config`, whose
  `_grouped_mm` seam (the one TorchTitan's MXFP8 converter also uses) runs `turbo_dist.ops.grouped_gemm`.

Tested against torchtitan 0.3.0 (the `torchtitan` extra). Not covered: async TP and CP attention
(TorchTitan drives those through torch's own `torch.distributed._symmetric_memory` async-TP and
`context_parallel` paths; see NOT_SUPPORTED), the DeepEP/HybridEP/minimal-async-EP backends (left alone),
and cudagraph-capturable (host-sync-free) dispatch.
"""
import logging
from dataclasses import dataclass

import torch

import turbo_dist.moe as _moe
import turbo_dist.ops as _ops

try:
    from torchtitan.config.override import derive, override
    from torchtitan.models.common.moe import GroupedExperts
    from torchtitan.models.common.token_dispatcher import (AllToAllTokenDispatcher, BaseEPTokenDispatcher,
                                                           LocalTokenDispatcher)
except ImportError as _exc:  # pragma: no cover - exercised only without torchtitan
    raise ImportError(
        "turbo_dist.integrations.torchtitan needs torchtitan (tested: 0.3.0): pip install 'turbo_dist[torchtitan]'"
    ) from _exc

log = logging.getLogger("turbo_dist")

TESTED_VERSIONS = ("0.3.0",)
NOT_SUPPORTED = {
    "async_tp": "TorchTitan's async TP is torch's symmetric-memory micro-pipelining selected inside its "
                "tensor-parallel plan (no override point for the fused all-gather/reduce-scatter matmuls); "
                "use turbo_dist.tp modules in a custom model instead",
    "cp_attention": "TorchTitan's context parallelism wraps SDPA/FlexAttention with torch's context_parallel; "
                    "there is no registered override for the CP attention kernel",
}


@dataclass(frozen=True, kw_only=True)
class TurboDistDispatchMetadata:
    """What `TurboDistTokenDispatcher.dispatch` hands to `combine`.

    handle: turbo_dist.moe dispatch handle. rows: [R] int64, for each routed row its received token.
    scores: [R] fp32 routing scores of the routed rows. num_recv_tokens: tokens this rank received.
    """

    handle: object
    rows: torch.Tensor
    scores: torch.Tensor
    num_recv_tokens: int


class TurboDistTokenDispatcher(BaseEPTokenDispatcher):
    """TorchTitan EP token dispatcher over turbo_dist.moe (a drop-in for `AllToAllTokenDispatcher`).

    dispatch: x_TD [T, D], topk_scores_TK [T, K] fp32, topk_expert_ids_TK [T, K] int64 ->
        routed_input_RD [R, D] (rows grouped by local expert, experts in order, source rank then token
        order inside an expert: the order TorchTitan's all-to-all path produces), tokens per local expert
        [e] int64, metadata.
    combine: routed_output_RD [R, D] -> [T, D] in x_TD's dtype: each row times its score (fp32), summed
        per received token, then combined over ranks (fp32).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseEPTokenDispatcher.Config):
        transport: str | None = None
        """turbo_dist.moe transport: "nvlink" | "collective" | None (Buffer's default choice)."""
        num_nvl_bytes: int = 0
        """Symmetric buffer of the nvlink transport (turbo_dist.moe.Buffer.get_nvl_buffer_size_hint)."""

    def __init__(self, config: Config):
        super().__init__(config)
        if config.transport not in (None, "nvlink", "collective"):
            raise ValueError(f"transport must be None, 'nvlink' or 'collective', got {config.transport!r}")
        if not isinstance(config.num_nvl_bytes, int) or config.num_nvl_bytes < 0:
            raise ValueError(f"num_nvl_bytes must be an int >= 0, got {config.num_nvl_bytes!r}")
        self.transport = config.transport
        self.num_nvl_bytes = config.num_nvl_bytes
        self.buffer = None

    def init_buffer(self) -> None:
        """Create the turbo_dist.moe.Buffer on the EP group (called by wire_meshes)."""
        if self.ep_mesh is None:
            self.buffer = None
            return
        group = self.ep_mesh.get_group()
        if self.num_experts % group.size():
            raise ValueError(f"num_experts={self.num_experts} must be divisible by the EP size {group.size()}")
        self.buffer = _moe.Buffer(group, self.num_nvl_bytes, transport=self.transport)
        log.info("turbo_dist.integrations.torchtitan: EP token dispatcher on turbo_dist.moe (%d ranks, transport %s)",
                 group.size(), self.buffer.transport)

    def dispatch(self, x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E):
        if self.ep_mesh is None:
            return LocalTokenDispatcher.dispatch(self, x_TD, topk_scores_TK, topk_expert_ids_TK,
                                                 num_local_tokens_per_expert_E)
        if self.buffer is None:
            raise RuntimeError("TurboDistTokenDispatcher: wire_meshes(ep_mesh=...) was not called")
        if x_TD.dim() != 2 or topk_scores_TK.shape != topk_expert_ids_TK.shape or \
                topk_expert_ids_TK.shape[0] != x_TD.shape[0]:
            raise ValueError(f"expected x_TD [T, D] and topk_* [T, K]; got {tuple(x_TD.shape)}, "
                             f"{tuple(topk_scores_TK.shape)}, {tuple(topk_expert_ids_TK.shape)}")
        recv_x, recv_idx, recv_w, counts, handle = _moe.dispatch(
            self.buffer, x_TD, topk_expert_ids_TK.to(torch.int64), topk_scores_TK.to(torch.float32),
            num_experts=self.num_experts)
        num_recv, k = recv_idx.shape
        num_local = self.num_experts // self.buffer.group_size
        flat = recv_idx.reshape(-1)
        # Stable sort by local expert keeps (source rank, token) order within an expert; slots of
        # experts elsewhere (-1) sort last and are cut off.
        key = torch.where(flat >= 0, flat, torch.full_like(flat, num_local))
        order = torch.sort(key, stable=True).indices[:sum(counts)]
        rows = torch.div(order, k, rounding_mode="floor")
        metadata = TurboDistDispatchMetadata(handle=handle, rows=rows, scores=recv_w.reshape(-1)[order],
                                             num_recv_tokens=num_recv)
        tokens_per_expert = torch.tensor(counts, dtype=torch.int64, device=x_TD.device)
        return recv_x[rows], tokens_per_expert, metadata

    def combine(self, routed_output_RD, metadata, x_TD):
        if self.ep_mesh is None:
            return LocalTokenDispatcher.combine(self, routed_output_RD, metadata, x_TD)
        if not isinstance(metadata, TurboDistDispatchMetadata):
            raise TypeError("combine needs the metadata TurboDistTokenDispatcher.dispatch returned")
        if routed_output_RD.shape[0] != metadata.rows.numel():
            raise ValueError(f"routed_output_RD has {routed_output_RD.shape[0]} rows, dispatch routed "
                             f"{metadata.rows.numel()}")
        weighted = routed_output_RD.to(torch.float32) * metadata.scores.unsqueeze(-1)
        per_token = torch.zeros(metadata.num_recv_tokens, routed_output_RD.shape[1], dtype=torch.float32,
                                device=routed_output_RD.device).index_add(0, metadata.rows, weighted)
        return _moe.combine(self.buffer, per_token.to(x_TD.dtype), metadata.handle)


class TurboDistGroupedExperts(GroupedExperts):
    """TorchTitan's GroupedExperts with its grouped matmuls on turbo_dist.ops.grouped_gemm (same weights)."""

    @dataclass(kw_only=True, slots=True)
    class Config(GroupedExperts.Config):
        pass

    def _grouped_mm(self, *, A, B_t, offs):
        # TorchTitan passes B_t = w.transpose(-2, -1) ([E, K, N] view of a contiguous [E, N, K]) and the
        # cumulative row ends; grouped_gemm takes the weight as stored (trans_b) and per-group lengths.
        offs = offs.to(torch.int64)
        group_lens = torch.diff(offs, prepend=offs.new_zeros(1))
        return _ops.grouped_gemm(A, B_t.transpose(-2, -1), group_lens, trans_b=True)


@override(target=AllToAllTokenDispatcher.Config, exact=True,
          description="turbo_dist.moe dispatch/combine for MoE expert parallelism")
def moe_token_dispatcher(cfg, *, transport=None, num_nvl_bytes=0):
    """Override factory: AllToAllTokenDispatcher.Config -> TurboDistTokenDispatcher.Config."""
    return derive(cfg, TurboDistTokenDispatcher.Config, transport=transport, num_nvl_bytes=num_nvl_bytes)


@override(target=GroupedExperts.Config, exact=True,
          description="turbo_dist.ops.grouped_gemm for MoE experts")
def grouped_experts(cfg):
    """Override factory: GroupedExperts.Config -> TurboDistGroupedExperts.Config."""
    return derive(cfg, TurboDistGroupedExperts.Config)


OVERRIDES = ("turbo_dist.integrations.torchtitan.moe_token_dispatcher",
             "turbo_dist.integrations.torchtitan.grouped_experts")

__all__ = ["TurboDistTokenDispatcher", "TurboDistGroupedExperts", "TurboDistDispatchMetadata",
           "moe_token_dispatcher", "grouped_experts", "OVERRIDES", "NOT_SUPPORTED", "TESTED_VERSIONS"]
