"""TorchTitan integration: turbo_dist.moe for MoE token dispatch/combine, turbo_dist.ops.grouped_gemm for experts,
turbo_dist.tp for async tensor parallelism.

TorchTitan swaps components through registered config overrides (`torchtitan.config.override`), switched
on from the job config; importing this module registers them and changes nothing else:

    --override.imports turbo_dist.integrations.torchtitan.moe_token_dispatcher
    --override.imports turbo_dist.integrations.torchtitan.grouped_experts
    --override.imports turbo_dist.integrations.torchtitan.async_tp_qkv        # the three async-TP overrides
    --override.imports turbo_dist.integrations.torchtitan.async_tp_row_linear
    --override.imports turbo_dist.integrations.torchtitan.async_tp_feed_forward
    --override.imports turbo_dist.integrations.torchtitan.cp_attention         # SDPA inner attention, CP
    --override.imports turbo_dist.integrations.torchtitan.compiled_async_tp    # compiled async TP (default TP path)
    # with options: 'turbo_dist.integrations.torchtitan.moe_token_dispatcher={"transport": "collective"}',
    #               'turbo_dist.integrations.torchtitan.cp_attention={"cp_comm_type": "a2a"}'

or in a Python job config: `OverrideConfig(imports=[*OVERRIDES, *ASYNC_TP_OVERRIDES, *CP_OVERRIDES])`.
TorchTitan logs every node it replaces ("[Override] ...: <fqn> <old Config> -> <new Config>").

- `moe_token_dispatcher` replaces every `AllToAllTokenDispatcher.Config` (the "standard" EP backend) with
  `TurboDistTokenDispatcher.Config`: tokens go to their experts' ranks with `turbo_dist.moe.dispatch`
  (one send per token and destination rank, DeepEP layout) and come back with `turbo_dist.moe.combine`;
  the routing scores are applied to the expert outputs before the combine, in fp32, as TorchTitan does.
  With EP=1 (no EP mesh) it reorders locally exactly like TorchTitan's LocalTokenDispatcher.
- `grouped_experts` replaces every `GroupedExperts.Config` with `TurboDistGroupedExperts.Config`, whose
  `_grouped_mm` seam (the one TorchTitan's MXFP8 converter also uses) runs `turbo_dist.ops.grouped_gemm`.
- `async_tp_qkv`, `async_tp_row_linear`, `async_tp_feed_forward` replace TorchTitan's own async-TP modules
  (`tp_gemm_backend="dist_gemm"`: AllGatherFusedQKVLinear, dist_gemm.RowParallelLinear,
  AllGatherFusedFeedForward; they need the spmd_types backend and sequence parallelism, which TorchTitan
  checks) with subclasses whose all-gather + GEMM and GEMM + reduce-scatter (forward and backward) run on
  turbo_dist.tp. Same parameters and checkpoints. They only apply where the model config selected
  "dist_gemm"; the default TP path (DTensor collectives around plain GEMMs) is left alone.
- `compiled_async_tp` leaves the config as it is and installs `turbo_dist.tp.torch_ops`: with the default TP path
  and `--compile.enable_async_tensor_parallel`, inductor's micro-pipeline-TP pass turns the all-gather + GEMM and
  GEMM + reduce-scatter into torch.ops.symm_mem's fused ops, which then run turbo_dist.tp.
- `cp_attention` replaces every `ScaledDotProductAttention.Config` (the SDPA inner attention) with
  `TurboDistAttention.Config`: attention on turbo_dist.ops, and with context parallelism on the
  "partial_dtensor" backend (TorchTitan's apply_cp_to_forward + headtail cp_shard) the whole-sequence
  attention runs on turbo_dist.cp (ring / a2a / allgather) over the CP mesh.

Tested against torchtitan 0.3.0 (the `torchtitan` extra). Not covered (see NOT_SUPPORTED): CP under the
spmd_types / full_dtensor backends (spmd_types is TorchTitan's default), Flex/varlen attention, the
DeepEP/HybridEP/minimal-async-EP backends (left alone), and cudagraph-capturable (host-sync-free) dispatch.
"""
import logging
from dataclasses import dataclass

import torch

import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

import turbo_dist.moe as _moe
import turbo_dist.ops as _ops
import turbo_dist.tp as _tp
from turbo_dist.tp import wgrad as _wgrad
from turbo_dist.ops import flash_attn_func
from turbo_dist.ops._autograd import first_order_only
from turbo_dist.ops._host import device_ints

try:
    from torchtitan.config.override import derive, override
    from torchtitan.models.common import dist_gemm as _dist_gemm
    from torchtitan.models.common.moe import GroupedExperts
    from torchtitan.models.common.token_dispatcher import (AllToAllTokenDispatcher, BaseEPTokenDispatcher,
                                                           LocalTokenDispatcher)
    from torchtitan.distributed.spmd_types import current_spmd_mesh
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.decoder import Decoder
except ImportError as _exc:  # pragma: no cover - exercised only without torchtitan
    raise ImportError(
        "turbo_dist.integrations.torchtitan needs torchtitan (tested: 0.3.0): pip install 'turbo_dist[torchtitan]'"
    ) from _exc

log = logging.getLogger("turbo_dist")

TESTED_VERSIONS = ("0.3.0",)
NOT_SUPPORTED = {
    "cp_spmd_types": "with spmd_backend 'spmd_types' (TorchTitan's default) or 'full_dtensor' the layer's sharding "
                     "config all-gathers K/V over CP before the inner attention and hands it a local q: the "
                     "ring/a2a exchange would have to replace that sharding, not the inner attention module. "
                     "TurboDistAttention raises NotImplementedError there; CP works with 'partial_dtensor'",
    "cp_flex_varlen": "FlexAttention / VarlenAttention inner attention (block masks, packed documents)",
    "async_tp_default_backend": "the default TP path (DTensor collectives around plain GEMMs) has no module to "
                                "replace: only its compiled async TP (--compile.enable_async_tensor_parallel) runs "
                                "ours, through the compiled_async_tp override (turbo_dist.tp.torch_ops)",
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
        tokens_per_expert = device_ints(counts, torch.int64, x_TD.device)  # from pinned memory: no stream wait
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


# ---------------------------------------------------------------------------------------------- async TP
# TorchTitan's async-TP modules (models/common/dist_gemm.py, selected by tp_gemm_backend="dist_gemm", spmd_types
# backend, sequence parallel) flatten activations sequence-major and call three autograd functions over
# torch.ops.symm_mem (CUDA only). The subclasses below keep their forwards' reshaping and parameters and run the
# same math on turbo_dist.tp instead (any backend: symmetric-memory pipelines on GPU, collectives on gloo).

class _AllGatherLinear(torch.autograd.Function):
    """y [M, N/R] = all_gather(x [M/R, K]) @ w.T (+ b); dx = reduce_scatter(dy @ w); dw = dy.T @ x_full, x_full
    gathered again in backward from the 1/R the forward keeps (turbo_dist.tp.wgrad), as TorchTitan's own does."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, keep=True):
        x = x.contiguous()
        x_full, (y,) = _tp.all_gather_matmul(x, [weight.t()], gather_dim=0, group=group)
        kept, ctx.kept_how = _wgrad.keep_input(group, x, x_full, 0) if keep else (None, None)
        ctx.save_for_backward(kept, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return y + bias if bias is not None else y

    @staticmethod
    @first_order_only("turbo_dist TorchTitan linear (async TP)")
    def backward(ctx, dy):
        kept, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _tp.matmul_reduce_scatter(dy, weight, scatter_dim=0, group=ctx.group) \
            if ctx.needs_input_grad[0] else None
        dw = _wgrad.weight_grads(ctx.group, kept, ctx.kept_how, [dy])[0] if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


class _AllGatherLinearPair(torch.autograd.Function):
    """(ya, yb) = all_gather(x) @ (wa.T, wb.T) with one all-gather (SwiGLU's w1/w3); dx is one GEMM + RS."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, group, keep=True):
        x = x.contiguous()
        x_full, (ya, yb) = _tp.all_gather_matmul(x, [weight_a.t(), weight_b.t()], gather_dim=0, group=group)
        kept, ctx.kept_how = _wgrad.keep_input(group, x, x_full, 0) if keep else (None, None)
        ctx.save_for_backward(kept, weight_a, weight_b)
        ctx.group = group
        return ya, yb

    @staticmethod
    @first_order_only("turbo_dist TorchTitan linear (async TP)")
    def backward(ctx, dya, dyb):
        kept, weight_a, weight_b = ctx.saved_tensors
        dya, dyb = dya.contiguous(), dyb.contiguous()
        dx = None
        if ctx.needs_input_grad[0]:  # dya @ wa + dyb @ wb as one product: one reduce-scatter
            dx = _tp.matmul_reduce_scatter(torch.cat([dya, dyb], dim=1), torch.cat([weight_a, weight_b], dim=0),
                                           scatter_dim=0, group=ctx.group)
        wanted = [(i, dy) for i, dy in ((1, dya), (2, dyb)) if ctx.needs_input_grad[i]]
        # one gather of the kept input feeds both weight gradients
        dws = _wgrad.weight_grads(ctx.group, kept, ctx.kept_how, [dy for _, dy in wanted]) if wanted else []
        grads = {i: dw for (i, _), dw in zip(wanted, dws)}
        return dx, grads.get(1), grads.get(2), None, None


class _LinearReduceScatter(torch.autograd.Function):
    """y [M/R, N] = reduce_scatter(x [M, K/R] @ w.T) (+ b); dx = all_gather(dy) @ w; db all-reduced."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        y = _tp.matmul_reduce_scatter(x.contiguous(), weight.t(), scatter_dim=0, group=group)
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return y + bias if bias is not None else y

    @staticmethod
    @first_order_only("turbo_dist TorchTitan linear (async TP)")
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dy_full, (dx,) = _tp.all_gather_matmul(dy, [weight], gather_dim=0, group=ctx.group)
        dw = dy_full.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:  # replicated bias, each rank saw its sequence shard
            db = dy.sum(0)
            dist.all_reduce(db, group=ctx.group)
        return (dx if ctx.needs_input_grad[0] else None), dw, db, None


_NOTED = set()


def _note_own_path(module, why):
    """Log once per class that TorchTitan's own implementation ran instead of turbo_dist's."""
    name = type(module).__name__
    if name not in _NOTED:
        _NOTED.add(name)
        log.info("%s: %s; TorchTitan's own implementation runs (nothing on turbo_dist.tp)", name, why)


def _tp_group():
    """TorchTitan's TP group of the current spmd_types mesh (what its dist_gemm modules use), or None."""
    mesh = current_spmd_mesh()
    if mesh is None or "tp" not in (mesh.mesh_dim_names or ()):
        return None
    group = mesh.get_group("tp")
    return group if group.size() > 1 else None


class TurboDistAllGatherFusedQKVLinear(_dist_gemm.AllGatherFusedQKVLinear):
    """TorchTitan's AllGatherFusedQKVLinear (same weights) with its all-gather + GEMM on turbo_dist.tp.

    x [B, S/tp, D] (sequence-parallel shard) -> q [B, S, n_heads/tp, hd], k, v [B, S, n_kv/tp, hd].
    Without a TP group it is TorchTitan's module (which warns that nothing is fused).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(_dist_gemm.AllGatherFusedQKVLinear.Config):
        pass

    def forward(self, x):
        group = _tp_group()
        if group is None:
            _note_own_path(self, "no TP group of size > 1 in the current mesh")
            return super().forward(x)
        bsz, _, dim = x.shape
        # Sequence outermost before flattening, so gathered rows are (seq, batch) row-major (as TorchTitan).
        qkv_flat = _AllGatherLinear.apply(x.transpose(0, 1).reshape(-1, dim), self.wqkv.weight, self.wqkv.bias,
                                          group, _wgrad.needed(self.wqkv.weight))
        seqlen = qkv_flat.shape[0] // bsz
        qkv = qkv_flat.view(seqlen, bsz, -1, self.r_dim, self.head_dim).transpose(0, 1)
        xq, xk, xv = torch.split(qkv, [self.heads_per_kv, 1, 1], dim=-2)
        return tuple(t.reshape(bsz, seqlen, -1, self.head_dim).contiguous() for t in (xq, xk, xv))


class TurboDistRowParallelLinear(_dist_gemm.RowParallelLinear):
    """TorchTitan's dist_gemm RowParallelLinear (attention `wo`) with GEMM + reduce-scatter on turbo_dist.tp.

    input [B, S, K/tp] -> [B, S/tp, N]. Without a TP group it is TorchTitan's module.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(_dist_gemm.RowParallelLinear.Config):
        pass

    def forward(self, input):
        group = _tp_group()
        if group is None:
            _note_own_path(self, "no TP group of size > 1 in the current mesh")
            return super().forward(input)
        bsz, seqlen, k_local = input.shape
        y_flat = _LinearReduceScatter.apply(input.transpose(0, 1).reshape(-1, k_local), self.weight, self.bias,
                                            group)
        return y_flat.view(seqlen // group.size(), bsz, -1).transpose(0, 1).contiguous()


class TurboDistAllGatherFusedFeedForward(_dist_gemm.AllGatherFusedFeedForward):
    """TorchTitan's AllGatherFusedFeedForward (SwiGLU, same weights): one all-gather feeding w1 and w3 and a
    w2 GEMM + reduce-scatter, on turbo_dist.tp. x [B, S/tp, D] -> [B, S/tp, D]."""

    @dataclass(kw_only=True, slots=True)
    class Config(_dist_gemm.AllGatherFusedFeedForward.Config):
        pass

    def forward(self, x):
        group = _tp_group()
        if group is None:
            _note_own_path(self, "no TP group of size > 1 in the current mesh")
            return super().forward(x)
        bsz, _, dim = x.shape
        h1, h3 = _AllGatherLinearPair.apply(x.transpose(0, 1).reshape(-1, dim), self.w1.weight, self.w3.weight,
                                            group, _wgrad.needed(self.w1.weight, self.w3.weight))
        y_flat = _LinearReduceScatter.apply(F.silu(h1) * h3, self.w2.weight, self.w2.bias, group)
        return y_flat.view(-1, bsz, y_flat.shape[-1]).transpose(0, 1).contiguous()


@override(target=_dist_gemm.AllGatherFusedQKVLinear.Config, exact=True,
          description="turbo_dist.tp all-gather + GEMM for the fused QKV projection (async TP)")
def async_tp_qkv(cfg):
    """Override factory: dist_gemm AllGatherFusedQKVLinear.Config -> TurboDistAllGatherFusedQKVLinear.Config."""
    return derive(cfg, TurboDistAllGatherFusedQKVLinear.Config)


@override(target=_dist_gemm.RowParallelLinear.Config, exact=True,
          description="turbo_dist.tp GEMM + reduce-scatter for the attention output projection (async TP)")
def async_tp_row_linear(cfg):
    """Override factory: dist_gemm RowParallelLinear.Config -> TurboDistRowParallelLinear.Config."""
    return derive(cfg, TurboDistRowParallelLinear.Config)


@override(target=_dist_gemm.AllGatherFusedFeedForward.Config, exact=True,
          description="turbo_dist.tp all-gather + GEMM / GEMM + reduce-scatter for the SwiGLU FFN (async TP)")
def async_tp_feed_forward(cfg):
    """Override factory: AllGatherFusedFeedForward.Config -> TurboDistAllGatherFusedFeedForward.Config."""
    return derive(cfg, TurboDistAllGatherFusedFeedForward.Config)


@override(target=Decoder.Config, description="torch.ops.symm_mem's fused async-TP ops run turbo_dist.tp (compiled "
          "async TP: --compile.enable_async_tensor_parallel); the config is unchanged")
def compiled_async_tp(cfg):
    """Override factory: installs turbo_dist.tp.torch_ops (our CUDA kernels for the fused all-gather + GEMM and
    GEMM + reduce-scatter ops that inductor's micro-pipeline-TP pass emits for TorchTitan's compiled async TP,
    the default TP path) and returns the model config unchanged: TorchTitan applies overrides while it builds the
    trainer, before the first compiled step. Harmless without compiled async TP (nothing calls the ops)."""
    _tp.torch_ops.install(devices=("cuda",))
    return cfg


# ---------------------------------------------------------------------------------------------- CP attention
class TurboDistAttention(ScaledDotProductAttention):
    """TorchTitan's SDPA inner attention on turbo_dist.ops.flash_attn_func, context-parallel on turbo_dist.cp.

    forward(q, k, v [B, L, heads, hd] (GQA: fewer k/v heads), scale, is_causal) -> [B, L, n_heads, hd].
    Context parallelism as TorchTitan's "partial_dtensor" backend drives it: `apply_cp_to_forward` (which
    accepts this module, a ScaledDotProductAttention) hands q/k/v over as DTensors sharded on the sequence
    (Shard(1)) over the CP mesh, and the whole-sequence attention runs over that mesh's group with
    `cp_comm_type` ("ring" | "a2a" | "allgather"). The shards must be in the layout of TorchTitan's
    load balancer: `load_balance=True` for "headtail" (TorchTitan's default; it is our zigzag),
    False for none. attention_masks (Flex/varlen) are refused like TorchTitan's SDPA refuses them; so is
    the spmd_types/full_dtensor CP path (local q with all-gathered k/v), with NotImplementedError.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(ScaledDotProductAttention.Config):
        cp_comm_type: str = "ring"
        """turbo_dist CP algorithm: "ring" (K/V ring, overlapped), "a2a" (Ulysses) or "allgather"."""
        load_balance: bool = True
        """True: shards in TorchTitan's "headtail" layout (its default load balancer); False: contiguous."""

    def __init__(self, config: Config):
        super().__init__(config)
        if config.cp_comm_type not in ("ring", "a2a", "allgather"):
            raise ValueError(f"cp_comm_type must be 'ring', 'a2a' or 'allgather', got {config.cp_comm_type!r}")
        self.cp_comm_type = config.cp_comm_type
        self.load_balance = bool(config.load_balance)

    def forward(self, q_BLNH, k_BLNH, v_BLNH, *, attention_masks=None, scale=None, enable_gqa=False,
                is_causal=True, **kwargs):
        if attention_masks is not None:
            raise ValueError("TurboDistAttention (like ScaledDotProductAttention) takes no attention_masks; "
                             "only causal/non-causal attention via is_causal")
        bundle = None
        if isinstance(q_BLNH, DTensor):
            mesh = q_BLNH.device_mesh
            for name, t in (("q", q_BLNH), ("k", k_BLNH), ("v", v_BLNH)):
                if not isinstance(t, DTensor) or t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(1),):
                    raise NotImplementedError(f"TurboDistAttention: {name} must be a DTensor sharded on the "
                                              "sequence (Shard(1)) over a 1-D CP mesh, as apply_cp_to_forward "
                                              f"makes it; got {getattr(t, 'placements', type(t).__name__)}")
            bundle = {"cp_group": mesh.get_group(), "cp_comm_type": self.cp_comm_type,
                      "load_balance": self.load_balance}
            q_BLNH, k_BLNH, v_BLNH = (t.to_local() for t in (q_BLNH, k_BLNH, v_BLNH))
        elif q_BLNH.shape[1] != k_BLNH.shape[1]:
            raise NotImplementedError(
                f"TurboDistAttention: q has {q_BLNH.shape[1]} positions and k {k_BLNH.shape[1]}: that is "
                "TorchTitan's spmd_types/full_dtensor context parallelism (k/v all-gathered for a local q), "
                "which turbo_dist does not serve; use parallelism.spmd_backend='partial_dtensor' for CP")
        return flash_attn_func(q_BLNH, k_BLNH, v_BLNH, softmax_scale=scale, causal=is_causal,
                               cp_param_bundle=bundle)


@override(target=ScaledDotProductAttention.Config, exact=True,
          description="turbo_dist attention / context-parallel attention for the SDPA inner attention")
def cp_attention(cfg, *, cp_comm_type="ring", load_balance=True):
    """Override factory: ScaledDotProductAttention.Config -> TurboDistAttention.Config."""
    return derive(cfg, TurboDistAttention.Config, cp_comm_type=cp_comm_type, load_balance=load_balance)


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
CP_OVERRIDES = ("turbo_dist.integrations.torchtitan.cp_attention",)
COMPILED_ASYNC_TP_OVERRIDES = ("turbo_dist.integrations.torchtitan.compiled_async_tp",)
ASYNC_TP_OVERRIDES = ("turbo_dist.integrations.torchtitan.async_tp_qkv",
                      "turbo_dist.integrations.torchtitan.async_tp_row_linear",
                      "turbo_dist.integrations.torchtitan.async_tp_feed_forward")

__all__ = ["TurboDistTokenDispatcher", "TurboDistGroupedExperts", "TurboDistDispatchMetadata",
           "TurboDistAllGatherFusedQKVLinear", "TurboDistRowParallelLinear", "TurboDistAllGatherFusedFeedForward",
           "moe_token_dispatcher", "grouped_experts", "async_tp_qkv", "async_tp_row_linear",
           "async_tp_feed_forward", "compiled_async_tp", "TurboDistAttention", "cp_attention", "OVERRIDES",
           "ASYNC_TP_OVERRIDES", "COMPILED_ASYNC_TP_OVERRIDES",
           "CP_OVERRIDES", "NOT_SUPPORTED", "TESTED_VERSIONS"]
