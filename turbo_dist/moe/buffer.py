"""`Buffer`: DeepEP's Python API (normal, internode and low-latency modes) over our transports.

Code written for `deep_ep.Buffer` runs after `from turbo_dist.moe import Buffer, Config, EventOverlap`.
"""
import logging
import operator

import torch

from ..runtime import EventOverlap, get_runtime
from ..runtime.config import env_str
from ..runtime.consistency import check_same_on_ranks, row_sig, tensor_sig
from . import collective
from .config import Config, DispatchHandle
from .layout import align_up, check_topk_idx, dispatch_layout

log = logging.getLogger("turbo_dist")

TRANSPORTS = ("nvlink", "collective")
_PAYLOAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _dense(t):
    """t contiguous (None stays None). Called inside the launched function: a copy is then made on the stream
    the transport runs on, after previous_event, never on the caller's stream where the transport would not wait
    for it."""
    return None if t is None else t.contiguous()


def _not_here(what, instead):
    """The one place unsupported uses of Buffer are refused (listed in README, "Not supported")."""
    raise NotImplementedError(f"turbo_dist.moe.Buffer: {what} is not supported; {instead}")


class _Destroyed:
    """Stands in for a destroyed Buffer's transports: any use says so."""

    def __getattr__(self, name):
        raise RuntimeError("this turbo_dist.moe.Buffer was destroyed (Buffer.destroy()); build a new Buffer")


def _check_counts(what, **counts):
    """The size hints' arguments: ints >= 1 (ValueError naming the one that is not)."""
    for name, v in counts.items():
        try:
            ok = not isinstance(v, bool) and operator.index(v) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{what}: {name} must be an int >= 1, got {v!r}")


class Buffer:
    """Expert-parallel dispatch/combine buffers for one process group (DeepEP's `Buffer`).

    Arguments (DeepEP's, same order): group (None: WORLD), num_nvl_bytes (bytes of the symmetric buffer
    the `nvlink` transport writes tokens into; size it with `Buffer.get_nvl_buffer_size_hint`),
    num_rdma_bytes (unused by the normal modes: more than one node selects the `hierarchical` internode
    transport whatever it says; with low_latency_mode, the initial size of the low-latency path's symmetric buffer (triton path), see
    `get_low_latency_rdma_size_hint`; it grows on demand), low_latency_mode (enables
    `low_latency_dispatch` / `low_latency_combine`, see moe/low_latency.py), num_qps_per_rank, allow_mnnvl
    (accepted, unused), allow_nvlink_for_low_latency_mode (accepted, unused: the low-latency triton path
    stores into peers over NVLink/CUDA IPC whatever it says; TURBO_DIST_MOE_LL_PATH=collective avoids
    that), explicitly_destroy, enable_shrink (low-latency mode: a rank mask, see low_latency_update_mask_buffer; on
    the triton path a receive that times out waiting for a rank masks it and completes without it, DeepEP's
    fault-tolerant decode), use_fabric (accepted, unused: CUDA IPC / NVSHMEM decide the memory handles), comm (an mpi4py communicator used when group is None: torch.distributed is
    initialized over it if it is not yet, and it must span the default group in its rank order, see
    runtime/mpi.py; ignored when a group is given). Ours, keyword only: transport = "nvlink" | "collective" |
    "hierarchical" | None (TURBO_DIST_MOE_TRANSPORT, else `hierarchical` when not low_latency_mode and
    more than one node; else `nvlink` when the runtime has peer access, one node and
    num_nvl_bytes > 0; else `collective`).

    Attributes: rank, group_size, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
    transport (the name of the transport every call of this buffer uses), runtime (turbo_dist Runtime).
    """

    num_sms: int = 20

    def __init__(self, group=None, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False, explicitly_destroy=False,
                 enable_shrink=False, comm=None, *, transport=None):
        if not isinstance(num_rdma_bytes, int) or num_rdma_bytes < 0:
            raise ValueError(f"num_rdma_bytes must be a non-negative int, got {num_rdma_bytes!r}")
        if group is None and comm is not None:
            from ..runtime.mpi import group_from_comm

            group = group_from_comm(comm)
        if not isinstance(num_nvl_bytes, int) or num_nvl_bytes < 0:
            raise ValueError(f"num_nvl_bytes must be a non-negative int, got {num_nvl_bytes!r}")
        self.runtime = get_runtime(group)
        rt = self.runtime
        self.group = rt.group
        self.rank = rt.rank
        self.group_size = rt.world_size
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = bool(enable_shrink)
        self.transport = self._pick_transport(transport)
        if self.transport == "nvlink":
            from .nvlink import NvlinkTransport

            self._impl = NvlinkTransport(rt, num_nvl_bytes)
        elif self.transport == "hierarchical":
            from .hierarchical import HierarchicalTransport

            self._impl = HierarchicalTransport(rt)
        else:
            self._impl = collective.CollectiveTransport(rt)
        self._ll = None
        if self.low_latency_mode:
            from .low_latency import LowLatency

            self._ll = LowLatency(rt, num_rdma_bytes, enable_shrink=bool(enable_shrink))
        elif enable_shrink:
            raise ValueError("enable_shrink (the low-latency rank mask) needs low_latency_mode=True")
        log.info("moe.Buffer: rank %d/%d transport %s (num_nvl_bytes=%d)", self.rank, self.group_size,
                 self.transport, num_nvl_bytes)

    def _pick_transport(self, requested):
        rt = self.runtime
        requested = requested or env_str("TURBO_DIST_MOE_TRANSPORT")
        if requested is None:
            if not self.low_latency_mode and rt.num_nodes > 1:
                # DeepEP's internode mode, whatever num_rdma_bytes says (the transport sizes itself; DeepEP's
                # own hint is 0 up to 8 ranks, which spread over 2+ nodes still need the two hops)
                return "hierarchical"
            if rt.has_peer_access and rt.num_nodes == 1 and self.num_nvl_bytes > 0:
                return "nvlink"
            return "collective"
        if requested == "hierarchical":
            return requested  # any topology (one node: the rail hop is a self copy)
        if requested not in TRANSPORTS:
            raise ValueError(f"transport={requested!r}: expected one of {TRANSPORTS + ('hierarchical',)}")
        if requested == "nvlink":
            if not rt.has_peer_access or rt.num_nodes != 1:
                raise RuntimeError(
                    "transport='nvlink' needs peer access to every rank of one node (CUDA symmetric memory); this "
                    f"group has shmem backend {rt.shmem_backend!r} over {rt.num_nodes} node(s): use 'collective'"
                )
            if self.num_nvl_bytes <= 0:
                raise ValueError("transport='nvlink' needs num_nvl_bytes > 0; see Buffer.get_nvl_buffer_size_hint")
        return requested

    # ----------------------------------------------------------------- DeepEP's static helpers
    def destroy(self):
        """Release the symmetric buffers (collective: every rank, after its last call; DeepEP: needs
        explicitly_destroy=True)."""
        if not self.explicitly_destroy:
            raise RuntimeError("`explicitly_destroy` flag must be set to call destroy()")
        for part in (self._impl, self._ll):
            close = getattr(part, "close", None)
            if close is not None:
                close()
        self._impl = _Destroyed()
        if self._ll is not None:
            self._ll = _Destroyed()

    @staticmethod
    def is_sm90_compiled():
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9

    @staticmethod
    def set_num_sms(new_num_sms):
        """Set the programs (SMs) the high-throughput kernels use (even, as in DeepEP)."""
        if not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2:
            raise ValueError(f"The SM count must be a positive even int, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture():
        """An EventOverlap on the current CUDA stream (a no-op event on CPU)."""
        return EventOverlap.record()

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        """Bytes of num_rdma_bytes for low-latency mode's symmetric buffer (it grows on demand if too small)."""
        from .low_latency import LowLatency

        _check_counts("get_low_latency_rdma_size_hint", hidden=hidden, num_ranks=num_ranks, num_experts=num_experts,
                      num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank)
        return LowLatency.size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_nvl_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk=8, fp8=False,
                                 dtype=torch.bfloat16):
        """Bytes of num_nvl_bytes that let the nvlink transport take any routing of up to
        `num_max_tokens_per_rank` tokens per rank (worst case: every token of every rank to one rank).

        hidden / dtype: the widest row (columns) and the payload dtype any dispatch, cached dispatch or
        combine of this Buffer moves. Experts that map hidden -> ffn and combine ffn-wide rows (and the
        autograd backward, which dispatches those rows' gradients) need hidden=max(hidden, ffn); an fp32
        payload needs dtype=torch.float32. fp8=True: dispatches move FP8 rows and their scales, and `dtype`
        sizes the combines (and cached dispatches of `dtype` rows, as autograd's backward makes)."""
        from .nvlink import required_nvl_bytes

        _check_counts("get_nvl_buffer_size_hint", num_max_tokens_per_rank=num_max_tokens_per_rank, hidden=hidden,
                      num_ranks=num_ranks, num_topk=num_topk)
        return required_nvl_bytes(num_max_tokens_per_rank * num_ranks, hidden, num_topk, num_ranks, dtype, fp8)

    def get_comm_stream(self):
        return self.runtime.comm_stream

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        """This rank's part of the communication buffer as a `dtype` tensor (from element `offset`, `size` shaped):
        the nvlink transport's symmetric buffer, or with use_rdma_buffer=True the low-latency mode's one (the
        buffer DeepEP keeps in RDMA memory; here symmetric memory on the triton low-latency path)."""
        if use_rdma_buffer:
            ll = self._ll
            if ll is None or ll._buffer is None:
                raise RuntimeError("get_local_buffer_tensor(use_rdma_buffer=True): this Buffer has no RDMA-side "
                                   "buffer: it exists in low_latency_mode=True with num_rdma_bytes > 0 on the triton "
                                   "low-latency path (the collective path moves tokens with collectives)")
            buf = ll._buffer
        elif self.transport != "nvlink":
            raise RuntimeError(f"get_local_buffer_tensor: the {self.transport} transport has no symmetric buffer "
                               "(only transport='nvlink' has one)")
        else:
            buf = self._impl.buffer
        t = buf.local(dtype)[offset:]
        return t if size is None else t[:torch.Size(size).numel()].view(size)

    @staticmethod
    def get_dispatch_config(num_ranks):
        """Recommended dispatch Config for `num_ranks` (uses Buffer.num_sms)."""
        if not isinstance(num_ranks, int) or num_ranks <= 0:
            raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
        chunk = {2: 24, 4: 6, 8: 6}.get(num_ranks, 8)
        return Config(Buffer.num_sms, chunk, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks):
        """Recommended combine Config for `num_ranks` (uses Buffer.num_sms)."""
        if not isinstance(num_ranks, int) or num_ranks <= 0:
            raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
        chunk = {2: 10, 4: 9, 8: 4}.get(num_ranks, 4)
        return Config(Buffer.num_sms, chunk, 256, 6, 128)

    # ----------------------------------------------------------------- streams and events
    def _launch(self, fn, previous_event, async_finish, allocate_on_comm_stream, inputs):
        """Run `fn` DeepEP-style: on the comm stream after `previous_event` (or the current stream), the
        current stream waiting for it unless `async_finish`; outputs owned by the comm stream if asked."""
        rt = self.runtime
        if rt.device.type != "cuda" or rt.comm_stream is None:
            return fn(), EventOverlap()
        if allocate_on_comm_stream and previous_event is None:
            raise ValueError("allocate_on_comm_stream=True needs previous_event (DeepEP's rule)")
        compute, comm = torch.cuda.current_stream(), rt.comm_stream
        if previous_event is not None and getattr(previous_event, "event", None) is not None:
            comm.wait_event(previous_event.event)
        else:
            comm.wait_stream(compute)
        with torch.cuda.stream(comm):
            out = fn()
        tensors = [t for t in _flatten(inputs) if t.device.type == "cuda"]
        for t in tensors:
            t.record_stream(comm)
        produced = [t for t in _flatten(out) if t.device.type == "cuda"]
        if not allocate_on_comm_stream:
            for t in produced:
                t.record_stream(compute)
        if async_finish:
            return out, EventOverlap.record(comm, extra_tensors=tuple(tensors + produced))
        compute.wait_stream(comm)
        return out, EventOverlap()

    # ----------------------------------------------------------------- layout / dispatch / combine
    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        """Where each token goes, computed on the device (no host sync).

        topk_idx: [num_tokens, num_topk] int64, -1 = no expert. num_experts: split evenly over the ranks.
        Returns (num_tokens_per_rank [num_ranks] int32, num_tokens_per_rdma_rank ([num_nodes] int32 on the
        hierarchical transport, else None), num_tokens_per_expert [num_experts] int32, is_token_in_rank [num_tokens, num_ranks] bool, event).
        """
        check_topk_idx(topk_idx, num_experts, self.group_size)
        self.runtime.check_tensor(topk_idx, "topk_idx")
        def run():  # the per-node counts too, on the launch's stream (async_finish: ready with its event)
            per_rank, per_expert, in_rank = dispatch_layout(topk_idx, num_experts, self.group_size)
            per_rdma = None
            if self.transport == "hierarchical":
                from .hierarchical import rdma_layout

                per_rdma = rdma_layout(in_rank, self.runtime.num_nodes)[0]
            return per_rank, per_rdma, per_expert, in_rank

        out, event = self._launch(run, previous_event, async_finish, allocate_on_comm_stream, (topk_idx,))
        return (*out, event)

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False):
        """Send each token once to every rank owning one of its experts.

        x: [num_tokens, hidden] bf16 (fp16/fp32 also accepted) or (x_fp8 [num_tokens, hidden] float8_e4m3fn,
            scales [num_tokens, hidden // 128] fp32).
        handle: from an earlier dispatch: same routing, new x, no layout exchange (topk_* must be None).
        num_tokens_per_rank [num_ranks] int32, is_token_in_rank [num_tokens, num_ranks] bool,
            num_tokens_per_expert [num_experts] int32: from get_dispatch_layout (needed without handle).
        num_tokens_per_rdma_rank: [num_nodes] int32 from get_dispatch_layout on the hierarchical transport;
            None on the others.
        topk_idx [num_tokens, num_topk] int64 / topk_weights [num_tokens, num_topk] fp32: optional.
        expert_alignment: each entry of num_recv_tokens_per_expert_list is rounded up to a multiple of it.
        num_worst_tokens: if > 0, outputs have exactly this many rows (valid ones first, then padding with
            topk_idx -1, weights 0) and the returned list is empty; the nvlink transport then runs with no
            host sync. config: Config (default get_dispatch_config).
        previous_event / async_finish / allocate_on_comm_stream: as DeepEP (CUDA); no-ops on CPU.

        Returns (recv_x (a tuple (fp8, scales) if x was), recv_topk_idx [num_recv, num_topk] int64 with
        expert ids local to this rank and -1 for experts elsewhere, recv_topk_weights [num_recv, num_topk]
        fp32 (0 where -1), num_recv_tokens_per_expert_list (python list [num_local_experts]), handle,
        event). Received rows are ordered by source rank, then by token index on the source.
        """
        check_same_on_ranks(self.runtime, "Buffer.dispatch", x=row_sig(x), cached=handle is not None,
                            num_experts=tensor_sig(num_tokens_per_expert), topk=row_sig(topk_idx, 1),
                            weights=topk_weights is not None, expert_alignment=expert_alignment,
                            num_worst_tokens=num_worst_tokens)
        if num_tokens_per_rdma_rank is not None:
            if self.transport != "hierarchical":
                _not_here(f"num_tokens_per_rdma_rank (internode dispatch) on the {self.transport} transport",
                          "pass None, or use transport='hierarchical' (the default on more than one node)")
            if num_tokens_per_rdma_rank.shape != (self.runtime.num_nodes,) or \
                    num_tokens_per_rdma_rank.dtype != torch.int32:
                raise ValueError(f"num_tokens_per_rdma_rank must be int32 [{self.runtime.num_nodes}], got "
                                 f"{_describe(num_tokens_per_rdma_rank)}")
        x, x_scales = self._check_x(x)
        config = self.get_dispatch_config(self.group_size) if config is None else config
        if not isinstance(config, Config):
            raise TypeError(f"config must be a turbo_dist.moe.Config, got {type(config).__name__}")
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise ValueError(f"expert_alignment must be an int >= 1, got {expert_alignment!r}")
        if not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
            raise ValueError(f"num_worst_tokens must be an int >= 0, got {num_worst_tokens!r}")
        self._impl.check_error()
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("dispatch with a cached handle takes no topk_idx/topk_weights (DeepEP's rule)")
            self._check_handle(handle, "dispatch with a cached handle")
            if is_token_in_rank is None:
                is_token_in_rank = handle.is_token_in_rank
            if x.size(0) != handle.is_token_in_rank.size(0):
                raise ValueError(f"x has {x.size(0)} tokens but the handle was made for "
                                 f"{handle.is_token_in_rank.size(0)}")
            (recv_x, recv_scales), event = self._launch(
                lambda: self._impl.cached_dispatch(_dense(x), _dense(x_scales), handle, config), previous_event,
                async_finish,
                allocate_on_comm_stream, (x, x_scales))
            return (recv_x, recv_scales) if x_scales is not None else recv_x, None, None, None, None, event

        num_tokens = x.size(0)
        self._check_layout(num_tokens, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)
        if topk_weights is not None and topk_idx is None:
            raise ValueError("topk_weights needs topk_idx")
        if topk_idx is not None:
            check_topk_idx(topk_idx, num_tokens_per_expert.numel(), self.group_size)
            if topk_idx.size(0) != num_tokens:
                raise ValueError(f"topk_idx has {topk_idx.size(0)} rows, x has {num_tokens} tokens")
            self.runtime.check_tensor(topk_idx, "topk_idx")
        if topk_weights is not None:
            if topk_weights.shape != topk_idx.shape or topk_weights.dtype != torch.float32:
                raise ValueError(f"topk_weights must be float32 {tuple(topk_idx.shape)}, got "
                                 f"{topk_weights.dtype} {tuple(topk_weights.shape)}")
        inputs = (x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)

        def run():
            return self._impl.dispatch(_dense(x), _dense(x_scales), topk_idx, topk_weights, num_tokens_per_rank,
                                       is_token_in_rank, num_tokens_per_expert, num_worst_tokens, config)

        out, event = self._launch(run, previous_event, async_finish, allocate_on_comm_stream, inputs)
        recv_x, recv_scales, recv_topk_idx, recv_topk_weights, expert_counts, handle = out
        counts = [] if num_worst_tokens else [align_up(int(c), expert_alignment) for c in expert_counts]
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        return recv, recv_topk_idx, recv_topk_weights, counts, handle, event

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish=False, allocate_on_comm_stream=False):
        """Send rows back to their source rank and sum them per token (no weights applied), in fp32.

        x: [num_recv_tokens, hidden] bf16/fp16/fp32, rows in the order dispatch returned them
            (with num_worst_tokens: that many rows, padding ignored).
        handle: from dispatch. topk_weights: [num_recv_tokens, num_topk] fp32, summed the same way.
        bias: a tensor or a pair of tensors [num_tokens, hidden] added to the result.
        Returns (combined_x [num_tokens, hidden] x.dtype (zeros for tokens sent nowhere),
        combined_topk_weights [num_tokens, num_topk] fp32 or None, event).
        """
        check_same_on_ranks(self.runtime, "Buffer.combine", x=row_sig(x), weights=topk_weights is not None,
                            biases=row_sig(bias))
        self._check_handle(handle, "combine")
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"combine x must be a [num_recv_tokens, hidden] tensor, got {_describe(x)}")
        if x.dtype not in _PAYLOAD_DTYPES:
            raise TypeError(f"combine x must be one of {_PAYLOAD_DTYPES}, got {x.dtype}")
        rows = handle.num_worst_tokens or handle.num_recv_tokens
        if rows is not None and x.size(0) != rows:
            raise ValueError(f"combine x has {x.size(0)} rows; the handle received {rows}")
        self.runtime.check_tensor(x, "x")
        if topk_weights is not None:
            if not isinstance(topk_weights, torch.Tensor) or topk_weights.dim() != 2 or \
                    topk_weights.size(0) != x.size(0) or topk_weights.dtype != torch.float32:
                raise ValueError(f"topk_weights must be float32 [{x.size(0)}, num_topk], got {_describe(topk_weights)}")
            self.runtime.check_tensor(topk_weights, "topk_weights")
        biases = () if bias is None else ((bias,) if isinstance(bias, torch.Tensor) else bias)
        if not isinstance(biases, (tuple, list)) or len(biases) > 2:
            raise ValueError(f"bias must be None, a tensor or a pair of tensors (DeepEP's rule), got {_describe(bias)}")
        num_tokens = handle.is_token_in_rank.size(0)
        for b in biases:
            if not isinstance(b, torch.Tensor) or b.shape != (num_tokens, x.size(1)) or b.dtype != x.dtype:
                raise ValueError(f"bias must be {x.dtype} [{num_tokens}, {x.size(1)}] (x's dtype), got {_describe(b)}")
            self.runtime.check_tensor(b, "bias")
        biases = tuple(biases)
        config = self.get_combine_config(self.group_size) if config is None else config
        self._impl.check_error()
        out, event = self._launch(lambda: self._impl.combine(_dense(x), topk_weights, biases, handle, config),
                                  previous_event, async_finish, allocate_on_comm_stream, (x, topk_weights) + biases)
        combined_x, combined_w = out
        return combined_x, combined_w, event

    # ----------------------------------------------------------------- not in this mode
    def internode_dispatch(self, *args, **kwargs):
        """DeepEP's internal entry point: `dispatch` on the hierarchical transport (same arguments)."""
        if self.transport != "hierarchical":
            raise RuntimeError(f"internode_dispatch needs the hierarchical transport; this buffer uses {self.transport!r}")
        return self.dispatch(*args, **kwargs)

    def internode_combine(self, *args, **kwargs):
        """DeepEP's internal entry point: `combine` on the hierarchical transport (same arguments)."""
        if self.transport != "hierarchical":
            raise RuntimeError(f"internode_combine needs the hierarchical transport; this buffer uses {self.transport!r}")
        return self.combine(*args, **kwargs)

    def _low_latency(self):
        if self._ll is None:
            raise RuntimeError("low-latency calls need Buffer(group, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint"
                               "(...), low_latency_mode=True)")
        return self._ll

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """Zero the low-latency counters on every rank (collective; also clears a recorded peer timeout)."""
        self._low_latency().clean()

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False):
        """Decode-time dispatch with fixed shapes and no host sync (DeepEP's signature; see moe/low_latency.py).

        x: [num_tokens, hidden] bf16 (num_tokens <= num_max_dispatch_tokens_per_rank, same value on every rank);
        topk_idx: [num_tokens, num_topk] int64, -1 = none. cumulative_local_expert_recv_stats: int32
        [num_local_experts], incremented by the received counts. dispatch_wait_recv_cost_stats: int64, at least
        num_ranks elements: [src] += SM clock cycles the receive waited for rank src (triton path; once per call,
        where DeepEP adds per local expert; the collective path raises NotImplementedError).
        use_fp8 (per-token, per-128-channel e4m3), round_scale (power-of-2 scales), use_ue8m0 (scales packed 4
        exponent bytes per int32); async_finish; return_recv_hook (send now, receive when the hook is called).
        Returns (recv_x [num_local_experts, num_max * num_ranks, hidden] (with use_fp8: (x_fp8, scales
        [.., hidden // 128] fp32 or [.., hidden // 512] int32 for UE8M0, column-major in the last two dims)),
        recv_count [num_local_experts] int32, handle, event, hook). Rows past recv_count[e] are garbage.
        """
        return self._low_latency().dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                            cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats,
                                            use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None):
        """Send expert outputs back and reduce them per token, weighted by topk_weights (fp32 accumulation).

        x: [num_local_experts, num_max * num_ranks, hidden] bf16 (rows as low_latency_dispatch laid them out);
        topk_idx / topk_weights: [num_tokens, num_topk] int64 / fp32, this rank's routing (-1 slots skipped);
        handle: from low_latency_dispatch; out: optional [num_tokens, hidden] result tensor.
        zero_copy: the rows are read from the tensor get_next_low_latency_combine_buffer(handle) returned
        (written in place by the expert computation; x's shape is checked, its values are not read).
        use_logfmt: the expert rows travel as 10-bit log-magnitude codes per 64 channels (1.45x fewer bytes,
        relative error per value <= 2 ** (step / 2) - 1, see kernels/moe_ll_logfmt.py; triton path only).
        combine_wait_recv_cost_stats: as dispatch_wait_recv_cost_stats, for the combine's wait (triton path).
        Returns (combined_x [num_tokens, hidden], event, hook).
        """
        return self._low_latency().combine(x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish,
                                           return_recv_hook, out, combine_wait_recv_cost_stats)

    def low_latency_update_mask_buffer(self, rank_to_mask, mask=False):
        """Mask (mask=True) or unmask another rank for this rank's low-latency calls (Buffer(enable_shrink=True)):
        nothing is sent to a masked rank or waited for from it, and its rows (dispatch) and expert outputs (combine)
        are left out, so tokens routed to its experts come back without their contribution. Stream-ordered."""
        self._low_latency().update_mask(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status):
        """mask_status: int32 tensor of at least num_ranks elements, on this rank's device: filled with the mask
        (1 = masked, by low_latency_update_mask_buffer or by a receive that timed out on the triton path)."""
        self._low_latency().query_mask(mask_status)

    def low_latency_clean_mask_buffer(self):
        """Unmask every rank. A rank masked after a timeout may have written into this rank's buffer late: when
        such a rank rejoins, call clean_low_latency_buffer on every rank before the next low-latency call."""
        self._low_latency().clean_mask()

    def get_next_low_latency_combine_buffer(self, handle):
        """bf16 [num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden]: write the expert
        outputs here, then call low_latency_combine(..., zero_copy=True). Two buffers alternate per zero-copy
        combine, so the next batch can be written while a combine reads the previous one."""
        return self._low_latency().next_combine_buffer(handle)

    # ----------------------------------------------------------------- validation
    def _check_handle(self, handle, what):
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"{what} needs the handle a turbo_dist.moe.Buffer.dispatch returned, got "
                            f"{type(handle).__name__}")
        made_by = handle.__dict__.get("transport")
        if made_by != self.transport:
            raise ValueError(f"{what}: the handle comes from a Buffer on the {made_by!r} transport but this Buffer "
                             f"uses {self.transport!r}; use the Buffer that dispatched")
        ranks = handle.is_token_in_rank.size(1)
        if ranks != self.group_size:
            raise ValueError(f"{what}: the handle was made for a group of {ranks} ranks but this Buffer's group has "
                             f"{self.group_size}; use the Buffer that dispatched")

    def _check_x(self, x):
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError("x as a tuple must be (x_fp8 [num_tokens, hidden], scales [num_tokens, hidden // 128])")
            x, scales = x
            if not isinstance(x, torch.Tensor) or x.dtype != torch.float8_e4m3fn or x.dim() != 2:
                raise TypeError(f"x[0] must be a float8_e4m3fn [num_tokens, hidden] tensor, got {_describe(x)}")
            if x.size(1) % 128:
                raise ValueError(f"FP8 x needs hidden divisible by 128, got {x.size(1)}")
            if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or \
                    scales.shape != (x.size(0), x.size(1) // 128):
                raise ValueError(f"x scales must be float32 [{x.size(0)}, {x.size(1) // 128}], got {_describe(scales)}")
            self.runtime.check_tensor(x, "x")
            self.runtime.check_tensor(scales, "x scales")
            return x, scales
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"x must be a [num_tokens, hidden] tensor, got {_describe(x)}")
        if x.dtype not in _PAYLOAD_DTYPES:
            raise TypeError(f"x must be bf16 (or fp16/fp32), or a (float8_e4m3fn, scales) tuple; got {x.dtype}")
        self.runtime.check_tensor(x, "x")
        return x, None

    def _check_layout(self, num_tokens, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert):
        r = self.group_size
        if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
            raise ValueError("dispatch without a handle needs num_tokens_per_rank, is_token_in_rank and "
                             "num_tokens_per_expert (from get_dispatch_layout)")
        if num_tokens_per_rank.shape != (r,) or num_tokens_per_rank.dtype != torch.int32:
            raise ValueError(f"num_tokens_per_rank must be int32 [{r}], got {_describe(num_tokens_per_rank)}")
        if is_token_in_rank.shape != (num_tokens, r) or is_token_in_rank.dtype != torch.bool:
            raise ValueError(f"is_token_in_rank must be bool [{num_tokens}, {r}], got {_describe(is_token_in_rank)}")
        if num_tokens_per_expert.dim() != 1 or num_tokens_per_expert.dtype != torch.int32 or \
                num_tokens_per_expert.numel() % r or num_tokens_per_expert.numel() == 0:
            raise ValueError(f"num_tokens_per_expert must be int32 [num_experts] with num_experts divisible by {r}, "
                             f"got {_describe(num_tokens_per_expert)}")
        for name, t in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                        ("num_tokens_per_expert", num_tokens_per_expert)):
            self.runtime.check_tensor(t, name)


def _describe(t):
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {tuple(t.shape)}"
    return type(t).__name__


def _flatten(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _flatten(o)
