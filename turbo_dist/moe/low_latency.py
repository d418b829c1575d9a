"""Low-latency MoE dispatch/combine (DeepEP's `low_latency_dispatch` / `low_latency_combine`), for decode.

Every shape is fixed by `num_max_dispatch_tokens_per_rank` (M), so nothing is read back to the host:
counts stay on the device and a dispatch + combine can be captured in a CUDA graph.

Output layout (DeepEP's): rank r owns experts [r * E_l, (r + 1) * E_l); expert e's tokens fill
recv_x[e, :recv_count[e]], ordered by source rank, then token index, then top-k slot (deterministic,
unlike DeepEP's arrival order); handle[0] = src_info [E_l, R * M] int32 (the token index on its source),
handle[1] = layout_range [E_l, R] int64 ((begin << 32) | count of the rows from each source).

Two paths, both ending in the same on-device placement (`ll_layout.place_tokens` in torch ops on CPU, its twin
kernels/moe_ll_place.py, two launches, on CUDA):
- `collective` (moe/ll_collective.py): dispatch is one all_gather of fixed-size slots, combine one
  all_gather of the weights and one all_to_all of per-rank fp32 partial sums. NCCL or gloo.
- `triton` (CUDA, peer access on one node): one kernel casts each token to FP8 (if asked) and stores it
  (and its expert ids) straight into slot [me, t] of every rank owning one of its experts and bumps a
  counter there; the receiver waits on its counters and places the slots (two kernels). Combine stores
  each expert row into slot [t, k] of the token's source, which waits and sums its k slots with the
  weights in one kernel (fp32, top-k order, as DeepEP). Dispatch and combine are 4 and 3 launches: the
  wait is a one-program kernel of its own (folded into the many-program receive kernels, every program
  polling the counters, a dispatch took 1.1 ms instead of 16 us in a CUDA graph on an H200). Waits are
  bounded (TURBO_DIST_TIMEOUT_S); a timeout is recorded in a host-mapped word and raised as RuntimeError
  by the next low-latency call.
Chosen by TURBO_DIST_MOE_LL_PATH=triton|collective, else `triton` where it can run. The triton kernels move
FP8 and 2-byte payloads only: on the triton path a dispatch of an fp32 x with use_fp8=False, or a combine of
an fp32 x, runs the collective path for that call (logged when an op switches to it; the dispatch handle's
`path` says which ran, `LowLatency.last_path` each op's last call). `return_recv_hook`
splits each call into the send (returned at once) and the receive (the hook): with `collective` the
hook waits on the asynchronous collective; with `triton` it waits on the counters.
"""
import logging

import torch

from ..kernels import moe_ll, moe_ll_logfmt, moe_ll_place
from ..runtime import EventOverlap
from ..runtime.config import env_str, peer_timeout_s
from ..runtime.consistency import check_same_on_ranks, row_sig, tensor_sig
from . import ll_collective
from .ll_checks import (LowLatencyHandle, check_combine, check_dispatch, check_mask_rank,
                        check_shrink, describe)
from .ll_layout import pack_ue8m0, per_token_cast_to_fp8, place_tokens

log = logging.getLogger("turbo_dist")

PATHS = ("triton", "collective")
_ALIGN = 256
_COUNTER_BYTES = 1 << 16  # [2 kinds][2 parities][R, padded to even] int64 counters at offset 0: up to 2048 ranks


def _cnt_stride(num_ranks):
    """Counters per (kind, parity) block: R padded to even, so every block starts 16-byte aligned. With an odd R
    the parity-1 blocks were only 8-byte aligned, which Triton compiles as another kernel: a CUDA graph captured
    on the other parity than the eager warm-up compiled and loaded a kernel inside the capture."""
    return num_ranks + num_ranks % 2
_HINT_TOPK = 16
_DISPATCH, _COMBINE = 0, 1


# ----------------------------------------------------------------------------- the engine
class LowLatency:
    """Low-latency dispatch/combine state of one Buffer (symmetric buffer, counters, error word)."""

    def __init__(self, rt, num_rdma_bytes=0, path=None, enable_shrink=False):
        self.rt = rt
        self.path = self._pick_path(path)
        # DeepEP's enable_shrink: int32 [R] rank mask, nonzero = masked (no sends to it, no waits for it, its
        # rows and expert outputs left out); on the triton path a wait that times out masks the late rank
        self.mask = torch.zeros(rt.world_size, dtype=torch.int32, device=rt.device) if enable_shrink else None
        self._parity = [0, 0]
        self._layout_key = None
        self._buffer = None
        self._views = {}  # (kind, parity, ...) -> views of the symmetric buffer's regions (_region_views)
        self._err = moe_ll.ErrorWord(rt.device) if self.path == "triton" else None
        self.last_path = {"dispatch": None, "combine": None}  # the path each op's last call took
        self._zero_copy = {}  # (E_l, R * M, hidden) -> two bf16 combine-input buffers, used in turn
        self._zero_copy_next = 0
        # one symmetric buffer per low-latency Buffer (DeepEP gives each its own RDMA memory)
        self._buffer_name = rt.new_buffer_name("moe_low_latency")
        if self.path == "triton" and num_rdma_bytes > 0:
            self._buffer = rt.symm_buffer(self._buffer_name, num_rdma_bytes)
        log.info("moe low-latency: rank %d/%d path %s", rt.rank, rt.world_size, self.path)

    def close(self):
        """Release this Buffer's symmetric buffer (collective: every rank, after its last call)."""
        if self._buffer is not None:
            self.rt.release_buffer(self._buffer_name)
            self._buffer = None

    def _takes_triton(self, op, payload):
        """Whether this call of `op` runs the triton kernels (2-byte or FP8 payloads) or the collective path;
        payload: the tensor that travels, or its dtype."""
        dtype = payload if isinstance(payload, torch.dtype) else payload.dtype
        path = "triton" if self.path == "triton" and dtype.itemsize <= 2 else "collective"
        if path != self.path and self.last_path[op] != path:
            log.info("moe low-latency %s: %s payload; the triton kernels move FP8 and 2-byte payloads only, so "
                     "this call runs the collective path", op, dtype)
        self.last_path[op] = path
        return path == "triton"

    def _pick_path(self, requested):
        rt = self.rt
        requested = requested or env_str("TURBO_DIST_MOE_LL_PATH")
        can_triton = rt.device.type == "cuda" and rt.has_peer_access and rt.num_nodes == 1
        if requested is None:
            return "triton" if can_triton else "collective"
        if requested not in PATHS:
            raise ValueError(f"TURBO_DIST_MOE_LL_PATH={requested!r}: expected one of {PATHS}")
        if requested == "triton" and not can_triton:
            raise RuntimeError("the triton low-latency path needs CUDA with peer access to every rank of one node "
                               f"(shmem backend {rt.shmem_backend!r}, {rt.num_nodes} node(s)); use 'collective'")
        return requested

    # ------------------------------------------------------------------ sizes and buffer layout
    @staticmethod
    def layout(num_max, hidden, num_ranks, num_topk):
        """Byte offsets of the triton path's regions (same on every rank) and the total size."""
        def up(n):
            return (n + _ALIGN - 1) // _ALIGN * _ALIGN

        slots = num_ranks * num_max
        sizes = {"x": up(slots * hidden * 2), "s": up(slots * (hidden // 128) * 4),
                 "idx": up(slots * num_topk * 4), "comb": up(num_max * num_topk * hidden * 2)}
        off, regions = _COUNTER_BYTES, []
        for _parity in range(2):
            r = {}
            for name, size in sizes.items():
                r[name] = off
                off += size
            regions.append(r)
        return regions, off

    @staticmethod
    def size_hint(num_max, hidden, num_ranks, num_experts):
        return LowLatency.layout(num_max, hidden, num_ranks, min(num_experts, _HINT_TOPK))[1]

    def _ensure_buffer(self, num_max, hidden, num_topk):
        key = (num_max, hidden, num_topk)
        if key == self._layout_key:
            return
        # A new geometry moves regions: drain every rank first (host sync; happens on the first call).
        regions, nbytes = self.layout(num_max, hidden, self.rt.world_size, num_topk)
        if self._layout_key is not None:
            torch.cuda.synchronize(self.rt.device)
            self.rt.barrier()
        buf = self.rt.symm_buffer(self._buffer_name, nbytes)
        if buf is not self._buffer:
            self._parity = [0, 0]
        self._buffer, self._regions, self._layout_key = buf, regions, key
        self._views = {}
        self.rt.barrier()

    def _region_views(self, kind, p, payload, hidden, k):
        """The counters and received-slot views one call reads, made once per geometry instead of ~15 view ops
        per eager call. payload: the row dtype on the wire, or "logfmt" (combine)."""
        key = (kind, p, payload, hidden, k)
        v = self._views.get(key)
        if v is not None:
            return v
        rt, reg = self.rt, self._regions[p]
        num_max = self._layout_key[0]
        slots = rt.world_size * num_max
        buf = self._buffer.local()
        if kind == _DISPATCH:
            words = hidden * payload.itemsize // 4  # rows move as int32 words (kernels/moe_ll_place.py)
            rows_x = buf[reg["x"]:reg["x"] + slots * words * 4].view(torch.int32).view(slots, words)
            rows_s = None
            if payload == torch.float8_e4m3fn:
                g = hidden // 128
                rows_s = buf[reg["s"]:reg["s"] + slots * g * 4].view(torch.float32).view(slots, g)
            all_idx = buf[reg["idx"]:reg["idx"] + slots * k * 4].view(torch.int32).view(rt.world_size, num_max, k)
            v = (self._counters(kind, p), rows_x, rows_s, all_idx)
        else:
            row_bytes = moe_ll_logfmt.row_bytes(hidden) if payload == "logfmt" else hidden * payload.itemsize
            rows = buf[reg["comb"]:reg["comb"] + num_max * k * row_bytes]
            if payload == "logfmt":  # int32 words [M, K, H / 64, 22] (kernels/moe_ll_logfmt.py)
                rows = rows.view(torch.int32).view(num_max, k, hidden // 64, moe_ll_logfmt.GROUP_WORDS)
            else:
                rows = rows.view(payload).view(num_max, k, hidden)
            v = (self._counters(kind, p), rows)
        self._views[key] = v
        return v

    def _counters(self, kind, parity):
        r = self.rt.world_size
        return self._buffer.local(torch.int64, (2, 2, _cnt_stride(r)))[kind, parity, :r]

    def _next_parity(self, kind):
        p = self._parity[kind]
        self._parity[kind] ^= 1
        return p

    # ------------------------------------------------------------------ errors
    def check_error(self):
        if self._err is None:
            return
        code, src, seen, expected = self._err.read()
        code &= ~moe_ll.TRAPPED
        if code:
            what = "low_latency_dispatch" if code == moe_ll.ERR_DISPATCH else "low_latency_combine"
            raise RuntimeError(
                f"{what}: rank {self.rt.rank} waited more than {peer_timeout_s():.1f}s for rank {src} "
                f"(counter {seen} of {expected}); that rank is stuck, crashed or ran a different sequence of "
                "low-latency calls. Raise TURBO_DIST_TIMEOUT_S if it is only slow; call "
                "Buffer.clean_low_latency_buffer on every rank before the next call.")

    # ------------------------------------------------------------------ rank mask (enable_shrink)
    def update_mask(self, rank_to_mask, mask=False):
        check_mask_rank(self, rank_to_mask)
        self.mask[rank_to_mask] = 1 if mask else 0

    def query_mask(self, mask_status):
        check_shrink(self)
        if not isinstance(mask_status, torch.Tensor) or mask_status.dtype != torch.int32 or \
                mask_status.numel() < self.rt.world_size or not mask_status.is_contiguous():
            raise ValueError(f"mask_status must be a contiguous int32 tensor of at least {self.rt.world_size} "
                             f"elements, got {describe(mask_status)}")
        self.rt.check_tensor(mask_status, "mask_status")
        mask_status.view(-1)[:self.rt.world_size].copy_(self.mask)

    def clean_mask(self):
        check_shrink(self)
        self.mask.zero_()

    def _live_idx(self, idx, experts_per_rank):
        """idx with -1 where its expert lives on a masked rank (torch ops, stream-ordered after the waits that may
        have masked one); idx itself without a mask."""
        if self.mask is None:
            return idx
        owner = idx.clamp_min(0) // experts_per_rank
        return torch.where((idx >= 0) & (self.mask[owner] == 0), idx, torch.full_like(idx, -1))

    def clean(self):
        """Zero the counters on every rank (collective, host-synchronising) and clear a recorded timeout."""
        if self.path == "triton" and self._buffer is not None:
            torch.cuda.synchronize(self.rt.device)
            self.rt.barrier()
            self._buffer.local(torch.int64, (2, 2, _cnt_stride(self.rt.world_size))).zero_()
            self._parity = [0, 0]
            torch.cuda.synchronize(self.rt.device)
            self.rt.barrier()
        if self._err is not None:
            self._err.clear()

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x, topk_idx, num_max, num_experts, cumulative_local_expert_recv_stats=None,
                 dispatch_wait_recv_cost_stats=None, use_fp8=True, round_scale=False, use_ue8m0=False,
                 async_finish=False, return_recv_hook=False):
        rt = self.rt
        check_same_on_ranks(rt, "Buffer.low_latency_dispatch", x=row_sig(x), topk=row_sig(topk_idx, 1),
                            num_max_dispatch_tokens_per_rank=num_max, num_experts=num_experts, use_fp8=use_fp8,
                            round_scale=round_scale, use_ue8m0=use_ue8m0, return_recv_hook=return_recv_hook)
        check_dispatch(self, x, topk_idx, num_max, num_experts, cumulative_local_expert_recv_stats,
                             dispatch_wait_recv_cost_stats, use_fp8, round_scale, use_ue8m0)
        self.check_error()
        e_l = num_experts // rt.world_size
        stats = cumulative_local_expert_recv_stats
        wait_stats = dispatch_wait_recv_cost_stats
        hidden = x.size(1)

        n, g = rt.world_size * num_max, hidden // 128
        dev = x.device
        out_x = torch.empty(e_l * n + 1, hidden, dtype=torch.float8_e4m3fn if use_fp8 else x.dtype, device=dev)
        if use_fp8:  # DeepEP's scale layout: [E_l, N, G] values stored column-major in the last two dims
            scales = torch.empty(e_l, g // 4 if use_ue8m0 else g, n, dtype=torch.int32 if use_ue8m0 else torch.float32,
                                 device=dev).transpose(1, 2)
        count = torch.empty(e_l, dtype=torch.int32, device=dev)
        src_info = torch.empty(e_l, n, dtype=torch.int32, device=dev)
        layout_range = torch.empty(e_l, rt.world_size, dtype=torch.int64, device=dev)
        dst = torch.empty(n, topk_idx.size(1), dtype=torch.int64, device=dev)
        handle = LowLatencyHandle((src_info, layout_range, num_max, hidden, num_experts), dst=dst,
                                  num_tokens=x.size(0), num_topk=topk_idx.size(1), path=None)

        def send():
            if self._takes_triton("dispatch", torch.float8_e4m3fn if use_fp8 else x.dtype):
                # the FP8 cast runs inside the send kernel
                return self._triton_dispatch_send(x, use_fp8, round_scale, topk_idx, num_max, e_l, hidden, wait_stats)
            # collective path: a masked rank's rows still travel (all_gather); the receive drops them
            if use_fp8:
                payload, x_scales = per_token_cast_to_fp8(x, round_scale)
            else:
                payload, x_scales = x.contiguous(), None
            return ll_collective.dispatch_send(rt, payload, x_scales, topk_idx, num_max, hidden, return_recv_hook)

        def receive(pending):
            rows_x, rows_s, all_idx, path = pending()
            handle.path = path
            if self.mask is not None:  # nothing from a masked source (its slots hold stale or partial data)
                all_idx = torch.where(self.mask.view(-1, 1, 1) != 0, torch.full_like(all_idx, -1), all_idx)
            # two kernels (kernels/moe_ll_place.py), the outputs written in place; they move rows of whole 4-byte
            # words (always so on the triton path; an odd bf16 hidden on the collective path takes the torch ops)
            if rows_x.is_cuda and rows_x.size(1) * rows_x.element_size() % 4 == 0:
                moe_ll_place.place(rows_x, rows_s, all_idx, rt.rank, e_l, out_x, scales if use_fp8 else None,
                                   use_ue8m0, count, src_info, layout_range, dst, stats)
                return
            out_s = torch.empty(e_l * n + 1, g, dtype=torch.float32, device=dev) if use_fp8 else None
            outs = place_tokens(rows_x, rows_s, all_idx, rt.rank, e_l, num_max, out_x, out_s)
            for o, v in zip((count, src_info, layout_range, dst), outs):
                o.copy_(v)
            if stats is not None:
                stats.add_(count)
            if use_fp8:
                s = out_s[:e_l * n].view(e_l, n, g)
                scales.copy_(pack_ue8m0(s) if use_ue8m0 else s)

        recv_x = out_x[:e_l * n].view(e_l, n, hidden)
        result = ((recv_x, scales) if use_fp8 else recv_x, count, handle)
        return self._run(send, receive, async_finish, return_recv_hook, (x, topk_idx, stats, dst, out_x), result)

    def _triton_dispatch_send(self, x, use_fp8, round_scale, topk_idx, num_max, e_l, hidden, wait_stats=None):
        rt = self.rt
        k = topk_idx.size(1)
        self._ensure_buffer(num_max, hidden, k)
        p = self._next_parity(_DISPATCH)
        reg = self._regions[p]
        cnt_off = (_DISPATCH * 2 + p) * _cnt_stride(rt.world_size) * 8
        moe_ll.dispatch_send(x if use_fp8 else x.contiguous(), None, topk_idx, num_max, self._buffer.peer_ptrs,
                             rt.rank, rt.world_size, e_l, reg["x"], reg["s"], reg["idx"], cnt_off, cast_fp8=use_fp8,
                             round_scale=round_scale, mask=self.mask)
        counters, rows_x, rows_s, all_idx = self._region_views(
            _DISPATCH, p, torch.float8_e4m3fn if use_fp8 else x.dtype, hidden, k)

        def pending():
            moe_ll.wait_counters(counters, self._err.addr, num_max, moe_ll.ERR_DISPATCH, peer_timeout_s(),
                                 stats=wait_stats, mask=self.mask)
            return rows_x, rows_s, all_idx, "triton"  # rows_x as int32 words
        return pending

    # ------------------------------------------------------------------ combine
    def next_combine_buffer(self, handle):
        """DeepEP's get_next_low_latency_combine_buffer: the bf16 [E_l, R * M, hidden] tensor the next
        zero-copy combine of this handle's shape reads its rows from (two such buffers alternate, so the next
        batch can be written while a combine reads the other)."""
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError("get_next_low_latency_combine_buffer needs the handle low_latency_dispatch returned")
        num_max, hidden, num_experts = handle[2], handle[3], handle[4]
        key = (num_experts // self.rt.world_size, num_max * self.rt.world_size, hidden)
        if key not in self._zero_copy:
            self._zero_copy[key] = [torch.empty(key, dtype=torch.bfloat16, device=self.rt.device) for _ in range(2)]
        return self._zero_copy[key][self._zero_copy_next]

    def _zero_copy_source(self, x, handle):
        """The buffer a zero-copy combine reads (x's shape is still checked, its values are not read)."""
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError("low_latency_combine needs the handle low_latency_dispatch returned")
        key = (handle[4] // self.rt.world_size, handle[2] * self.rt.world_size, handle[3])
        if key not in self._zero_copy:
            raise ValueError("low_latency_combine(zero_copy=True) reads the rows written into "
                             "get_next_low_latency_combine_buffer(handle); call it first (or pass zero_copy=False)")
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != key:
            raise ValueError(f"low_latency_combine x must be {list(key)}, got {describe(x)}")
        return self._zero_copy[key][self._zero_copy_next]  # flipped once the call is accepted (combine)

    def combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False, async_finish=False,
                return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None):
        rt = self.rt
        check_same_on_ranks(rt, "Buffer.low_latency_combine", x=tensor_sig(x), topk=row_sig(topk_idx, 1),
                            use_logfmt=use_logfmt, zero_copy=zero_copy, return_recv_hook=return_recv_hook)
        if zero_copy:
            x = self._zero_copy_source(x, handle)
        check_combine(self, x, topk_idx, topk_weights, handle, use_logfmt, out, combine_wait_recv_cost_stats)
        self.check_error()
        if zero_copy:  # only now: a refused call leaves the buffer the caller writes next where it was
            self._zero_copy_next ^= 1
        num_max, hidden = handle[2], handle[3]
        t, k = topk_idx.shape

        def send():
            if self._takes_triton("combine", x):
                return self._triton_combine_send(x, handle, num_max, hidden, k, use_logfmt, combine_wait_recv_cost_stats)
            weights = torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights))
            return ll_collective.combine_send(rt, x, weights, handle, num_max, hidden, return_recv_hook)

        result = out if out is not None else torch.empty(t, hidden, dtype=x.dtype, device=x.device)

        def receive(pending):
            kind, data = pending()
            if kind in ("slots", "logfmt"):  # [M, K, ...]: one row per top-k slot, weighted, summed in top-k order
                reduce = moe_ll_place.combine_reduce if kind == "slots" else moe_ll_logfmt.combine_reduce
                idx = self._live_idx(topk_idx, x.size(0))  # a masked expert rank's slots are left out
                if result.stride(1) == 1:
                    reduce(data, idx, topk_weights, result)
                else:
                    result.copy_(reduce(data, idx, topk_weights, torch.empty_like(x[0, :t])))
                return
            acc = torch.zeros(t, hidden, dtype=torch.float32, device=x.device)
            for r in range(rt.world_size):  # [R, M, H] fp32 partial sums, one per expert rank, summed in rank order
                # a masked rank's partial sums are left out, not multiplied by 0 (inf * 0 is NaN)
                acc += data[r, :t] if self.mask is None else torch.where(self.mask[r] == 0, data[r, :t], 0.0)
            result.copy_(acc)

        return self._run(send, receive, async_finish, return_recv_hook, (x, topk_idx, topk_weights), (result,))

    def _triton_combine_send(self, x, handle, num_max, hidden, k, use_logfmt=False, wait_stats=None):
        rt = self.rt
        self._ensure_buffer(num_max, hidden, k)
        p = self._next_parity(_COMBINE)
        reg = self._regions[p]
        cnt_off = (_COMBINE * 2 + p) * _cnt_stride(rt.world_size) * 8
        send = moe_ll_logfmt.combine_send if use_logfmt else moe_ll.combine_send
        send(x.view(-1, hidden), handle.dst, self._buffer.peer_ptrs, rt.rank, rt.world_size, num_max, reg["comb"],
             cnt_off, mask=self.mask)
        kind = "logfmt" if use_logfmt else "slots"
        counters, rows = self._region_views(_COMBINE, p, "logfmt" if use_logfmt else x.dtype, hidden, k)

        def pending():
            # one count per (token slot, k) program of every source (moe_ll.combine_send)
            moe_ll.wait_counters(counters, self._err.addr, num_max * k, moe_ll.ERR_COMBINE, peer_timeout_s(),
                                 stats=wait_stats, mask=self.mask)
            return kind, rows
        return pending

    # ------------------------------------------------------------------ streams, hooks
    def _run(self, send, receive, async_finish, return_recv_hook, inputs, result):
        """send() queues the transfer and returns `pending`; receive(pending) fills the preallocated `result`.
        With return_recv_hook the caller runs the receive later through the returned hook."""
        rt = self.rt
        use_comm = async_finish and rt.device.type == "cuda" and rt.comm_stream is not None
        if use_comm:
            rt.comm_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(rt.comm_stream):
                pending = send()
                if not return_recv_hook:
                    receive(pending)
        else:
            pending = send()
            if not return_recv_hook:
                receive(pending)
        hook = None
        if return_recv_hook:
            state = {"done": False}

            def receive_hook():
                if state["done"]:
                    raise RuntimeError("this low-latency receive hook was already called")
                self.check_error()
                receive(pending)
                state["done"] = True
            hook = receive_hook
        event = EventOverlap()
        if use_comm:
            keep = tuple(t for t in _flatten(inputs) + _flatten(result) if t.is_cuda)
            for t in keep:
                t.record_stream(rt.comm_stream)
            event = EventOverlap.record(rt.comm_stream, extra_tensors=keep)
        return (*result, event, hook)

# ----------------------------------------------------------------------------- helpers
def _flatten(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flatten(o)]
    return []

