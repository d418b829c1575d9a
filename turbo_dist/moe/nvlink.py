"""The `nvlink` transport: dispatch/combine by Triton kernels writing into peers' symmetric buffers.

Per Buffer, two symmetric buffers: `data` (num_nvl_bytes) and a small `signal` buffer (flags and
count slots, see turbo_dist/kernels/moe_nvlink.py). One op (dispatch, cached dispatch, combine) is:

  dispatch:  notify kernel (every rank writes its counts into every peer and raises its barrier flag;
             waits for all) -> [one host read of the counts, to size the outputs; skipped with
             num_worst_tokens] -> send kernel (each of `num_sms` channels writes its tokens' rows,
             scales, rank-local top-k and weights straight into the receivers' data regions at their
             final row: source rank, then token order; then raises its channel flag there) ->
             receive kernel (waits on every (source, channel) flag, copies the rows out, pads).
  cached dispatch / combine: the same without counts (the handle has them on the device), the
             barrier fused into the send kernel: no host sync. Combine writes every received row back
             into its source's data region; the source sums them in fp32 in rank order (exactly the
             collective transport's arithmetic, so results are bit-identical) and adds the biases.

Every op starts with a device-side barrier, so a rank never writes into a peer's data region while
that peer still reads the previous op's rows; count slots are double-buffered by epoch parity.
Waits are bounded (TURBO_DIST_TIMEOUT_S): a timeout leaves an error code in a device tensor, which
`check_error()` turns into a RuntimeError naming the peer (at the next call; the one host read of a
plain dispatch checks it at once). A batch that does not fit `num_nvl_bytes` raises ValueError naming
the size to use, on the host when the counts are known there, else from the device guard.
"""
import logging

import torch

from ..kernels import moe_nvlink as K
from ..runtime.config import peer_timeout_s
from .config import DispatchHandle
from .layout import token_positions

log = logging.getLogger("turbo_dist")

MAX_CHANNELS = 128        # flags per source in the signal buffer: Config.num_sms above this is clamped
MAX_LOCAL_EXPERTS = 1024  # experts per rank a notify slot holds
_ALIGN = 256


def _align(n):
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def signal_layout(num_ranks):
    """(barrier_off, flag_off, counts_off, slot_width, total int32 elements) of the signal buffer."""
    barrier_off = 0
    flag_off = _align(num_ranks * 4) // 4
    counts_off = flag_off + num_ranks * MAX_CHANNELS
    width = num_ranks + MAX_LOCAL_EXPERTS
    return barrier_off, flag_off, counts_off, width, counts_off + 2 * num_ranks * width


def _regions(nbytes, widths):
    """Largest row count `cap` such that arrays [cap, width_i bytes] (each 256-aligned) fit in nbytes.
    Returns (cap, offsets)."""
    row = sum(widths)
    cap = max((nbytes - len(widths) * _ALIGN) // max(row, 1), 0)
    offs, off = [], 0
    for w in widths:
        offs.append(off)
        off += _align(cap * w)
    return cap, offs


def _dispatch_widths(hidden_bytes, num_scales, num_topk, has_weights):
    return [hidden_bytes, 4 * num_scales, 8 * num_topk, 4 * num_topk if has_weights else 0, 4]


def _combine_widths(hidden_bytes, num_topk):
    return [hidden_bytes, 4 * num_topk]


def required_nvl_bytes(num_rows, hidden, num_topk, num_ranks, dtype, fp8=False):
    """num_nvl_bytes for `num_rows` received rows (dispatch) and rows sent back (combine).

    dtype: the 16/32-bit payload (the combine's rows, and the dispatch's without fp8); fp8=True: dispatches move
    float8_e4m3fn rows and their scales, combines `dtype` rows.
    """
    elt = torch.empty((), dtype=dtype).element_size()
    scales = hidden // 128 if fp8 else 0
    d = sum(_dispatch_widths(hidden * (1 if fp8 else elt), scales, num_topk, True))
    c = sum(_combine_widths(hidden * elt, num_topk))  # also covers a cached dispatch of `dtype` rows (autograd)
    return int(num_rows) * max(d, c) + 5 * _ALIGN


def _bits(t):
    """`t` [N, H] viewed as the widest int type that divides its rows (the kernels move bits)."""
    row_bytes = t.size(1) * t.element_size()
    for dt, size in ((torch.int32, 4), (torch.int16, 2), (torch.uint8, 1)):
        if row_bytes % size == 0 and size >= 1:
            try:
                return t.view(dt)
            except RuntimeError:
                continue
    return t.view(torch.uint8)


def _ptrs(buf, rt):
    if buf.peer_ptrs is not None:
        return buf.peer_ptrs
    if rt.world_size == 1:  # no peer access needed: the only "peer" is us (CPU interpreter, tests)
        return torch.tensor([buf.local().data_ptr()], dtype=torch.int64, device=rt.device)
    raise RuntimeError("the nvlink transport needs peer access (CUDA symmetric memory) between all ranks")


class NvlinkTransport:
    """Transport object the Buffer drives (same methods as collective.CollectiveTransport).

    rt: turbo_dist Runtime (peer access, one node; world_size 1 also works without it);
    num_nvl_bytes: size of the data buffer every rank exposes (Buffer.get_nvl_buffer_size_hint).
    Collective: every rank constructs it in the same order.
    """

    name = "nvlink"

    def __init__(self, rt, num_nvl_bytes):
        if not isinstance(num_nvl_bytes, int) or num_nvl_bytes <= 0:
            raise ValueError(f"the nvlink transport needs num_nvl_bytes > 0, got {num_nvl_bytes!r}")
        self.rt = rt
        name = rt.new_buffer_name("moe.nvlink")  # each transport its own buffers
        self.requested_bytes = num_nvl_bytes
        self.buffer = rt.symm_buffer(f"{name}.data", num_nvl_bytes)
        self.barrier_off, self.flag_off, self.counts_off, self.slot_width, n_sig = signal_layout(rt.world_size)
        self.signal = rt.symm_buffer(f"{name}.signal", n_sig * 4)
        self.sig_local = self.signal.local(torch.int32, (n_sig,))
        self.data_ptrs = _ptrs(self.buffer, rt)
        self.sig_ptrs = _ptrs(self.signal, rt)
        self.err = torch.zeros(K.ERR_NUMEL, dtype=torch.int32, device=rt.device)
        cuda = rt.device.type == "cuda"
        self.err_host = torch.zeros(K.ERR_NUMEL, dtype=torch.int32, pin_memory=True) if cuda else self.err
        self.epoch = 0
        self.timeout_s = peer_timeout_s()
        # Buffers are zeroed on allocation; make sure that happened everywhere before anyone signals.
        if cuda:
            torch.cuda.synchronize(rt.device)
        if rt.world_size > 1:
            rt.barrier()

    # ----------------------------------------------------------------- helpers
    def _refuse_capture(self):
        """The kernels' epochs are host ints baked into a captured graph: from its second replay every wait would
        already be met and receivers would read before peers wrote."""
        if self.rt.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise NotImplementedError("the nvlink transport cannot be captured in a CUDA graph (its flag epochs are "
                                      "host values); capture the low-latency mode, or run this call eagerly")

    def close(self):
        """Release this transport's symmetric buffers (collective: every rank, after its last call)."""
        for buf in (self.buffer, self.signal):
            self.rt.release_buffer(buf.name)

    def _next_epoch(self):
        self.epoch += 1
        if self.epoch >= 2 ** 31 - 1:
            raise RuntimeError("nvlink transport: epoch counter exhausted; create a new Buffer")
        return self.epoch

    @staticmethod
    def _channels(config):
        return max(1, min(int(config.num_sms), MAX_CHANNELS))

    def _after_op(self):
        if self.err_host is not self.err:
            self.err_host.copy_(self.err, non_blocking=True)

    def _too_small(self, rows, row_bytes, what, x=None):
        need = rows * row_bytes + 5 * _ALIGN
        payload = ""
        if x is not None:  # say what the row is: a combine of wider rows than dispatched is the usual cause
            dt = str(x.dtype).replace("torch.", "")
            payload = (f"; its x rows are {x.size(1)} {dt} values, so give the hint hidden >= {x.size(1)} and "
                       f"dtype={x.dtype} (hidden: the widest row any dispatch or combine of this Buffer moves)")
        return ValueError(
            f"nvlink {what}: a rank needs {rows} rows of {row_bytes} bytes in its symmetric buffer, more than "
            f"num_nvl_bytes={self.requested_bytes} (allocated {self.buffer.nbytes}) holds; create the Buffer with "
            f"num_nvl_bytes >= {need} (Buffer.get_nvl_buffer_size_hint(num_max_tokens_per_rank, hidden, "
            f"num_ranks, ...) covers any routing){payload}")

    def _raise_if(self, vals):
        code, a, b, c = (int(v) for v in vals[:K.ERR_NUMEL])
        if code == K.ERR_TIMEOUT:
            raise RuntimeError(
                f"nvlink transport (rank {self.rt.rank}): a GPU wait on peer rank {a} timed out after "
                f"{self.timeout_s:.1f}s (signal slot {b}, op epoch {c}); that rank is stuck, crashed or issued a "
                "different sequence of dispatch/combine calls (or another Config.num_sms). Raise "
                "TURBO_DIST_TIMEOUT_S if it is only slow. This Buffer is unusable now.")
        if code == K.ERR_CAPACITY:
            raise ValueError(f"{self._too_small(a, c, '(device check)')}. This Buffer is unusable now (its kernels "
                             "skip every wait once an error is recorded): create a new Buffer")
        if code == K.ERR_WORST:
            raise ValueError(f"num_worst_tokens={b} was smaller than the {a} tokens a rank received in an earlier "
                             "call (checked on the GPU, reported now); pass at least num_ranks * num_tokens. This "
                             "Buffer is unusable now (its kernels skip every wait once an error is recorded): "
                             "create a new Buffer")
        if code:
            raise RuntimeError(f"nvlink transport: unknown device error record {vals}")

    def check_error(self, sync=False):
        """Raise if a kernel recorded an error. sync=False reads the copy made after the last op (no host
        sync: it may lag the op still running); sync=True waits for the device first."""
        self._raise_if(self.err.tolist() if sync else self.err_host.tolist())

    def _handle_tensors(self, handle):
        """Device tensors the cached dispatch and the combine derive from the handle (made once)."""
        nv = handle.__dict__.get("_nv")
        if nv is None:
            if getattr(handle, "transport", None) != "nvlink":
                raise ValueError(f"this handle comes from the {getattr(handle, 'transport', '?')!r} transport; "
                                 "use the same Buffer (transport) for dispatch, combine and cached dispatch")
            rpm, matrix = handle[0], handle[1]
            me, R = self.rt.rank, self.rt.world_size
            row_prefix = torch.cumsum(matrix, 1, dtype=torch.int32) - matrix
            nv = {
                "recv_off": (rpm[me] - matrix[me]).contiguous(),   # our block's first row at each receiver
                "recv_total": rpm[R - 1].contiguous(),              # rows each rank receives
                "num_recv": rpm[R - 1, me:me + 1].contiguous(),
                "seg_end": rpm[:, me].contiguous(),                 # rows from sources <= s, at us
                "seg_cnt": matrix[:, me].contiguous(),
                "dst_off": row_prefix[:, me].contiguous(),          # our block in each source's send order
                "send_total": matrix.sum(1, dtype=torch.int32),     # rows each source gets back
            }
            handle.__dict__["_nv"] = nv
        return nv

    # ----------------------------------------------------------------- dispatch
    def dispatch(self, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                 num_tokens_per_expert, num_worst_tokens, config):
        rt = self.rt
        self._refuse_capture()
        R, me = rt.world_size, rt.rank
        T = x.size(0)
        L = num_tokens_per_expert.numel() // R
        if L > MAX_LOCAL_EXPERTS:
            raise ValueError(f"nvlink transport: {L} experts per rank; at most {MAX_LOCAL_EXPERTS} are supported")
        C = self._channels(config)
        xv = _bits(x)
        S = x_scales.size(1) if x_scales is not None else 0
        k = topk_idx.size(1) if topk_idx is not None else 0
        has_w = topk_weights is not None
        widths = _dispatch_widths(xv.size(1) * xv.element_size(), S, k, has_w)
        cap, offs = _regions(self.buffer.nbytes, widths)
        if num_worst_tokens and num_worst_tokens > cap:
            raise self._too_small(num_worst_tokens, sum(widths), "dispatch (num_worst_tokens rows)")
        in_rank = is_token_in_rank.contiguous()
        # The kernel indexes top-k rows as [T, K] row-major: a strided caller view (e.g. a column slice) must
        # not be read as if it were one.
        topk_idx = topk_idx.contiguous() if topk_idx is not None else None
        topk_weights = topk_weights.contiguous() if topk_weights is not None else None
        epoch = self._next_epoch()
        counts = K.notify(self.sig_ptrs, self.sig_local, num_tokens_per_rank.contiguous(),
                          num_tokens_per_expert.contiguous(), self.err, epoch, me, R, self.barrier_off,
                          self.counts_off, self.slot_width, self.timeout_s)
        send_head = token_positions(in_rank)
        matrix = counts[:, :R].contiguous()
        rpm = torch.cumsum(matrix, 0, dtype=torch.int32)
        send_offsets = (torch.cumsum(matrix[me], 0, dtype=torch.int32) - matrix[me]).contiguous()
        attrs = dict(num_worst_tokens=num_worst_tokens, num_tokens=T, transport="nvlink", send_counts=None,
                     recv_counts=None, num_recv_tokens=None, max_recv_tokens=None, max_send_tokens=None)
        expert_counts = []
        if not num_worst_tokens:
            host = torch.cat([counts.flatten(), self.err]).tolist()  # the one host sync of a plain dispatch
            self._raise_if(host[-K.ERR_NUMEL:])
            w = R + L
            mat = [host[s * w:s * w + R] for s in range(R)]
            expert_counts = [sum(host[s * w + R + e] for s in range(R)) for e in range(L)]
            recv_totals = [sum(mat[s][d] for s in range(R)) for d in range(R)]
            if max(recv_totals) > cap:  # every rank sees the same matrix: all raise, none is left waiting
                self._after_op()
                raise self._too_small(max(recv_totals), sum(widths), "dispatch")
            attrs.update(send_counts=mat[me], recv_counts=[mat[s][me] for s in range(R)],
                         num_recv_tokens=recv_totals[me], max_recv_tokens=max(recv_totals),
                         max_send_tokens=max(sum(r) for r in mat))
        rows_out = num_worst_tokens or attrs["num_recv_tokens"]
        handle = DispatchHandle((rpm, matrix, send_offsets, None, in_rank, send_head), **attrs)
        nv = self._handle_tensors(handle)
        layout = dict(zip(("off_x", "off_s", "off_i", "off_w", "off_src"), offs))
        K.dispatch_send(xv, x_scales, topk_idx, topk_weights, in_rank, send_head, nv["recv_off"], nv["recv_total"],
                        self.data_ptrs, self.sig_ptrs, self.sig_local, self.err, epoch, me, R, C, MAX_CHANNELS, L,
                        layout, cap, num_worst_tokens, sum(widths), self.flag_off, self.barrier_off, self.timeout_s,
                        barrier=False)
        dev = x.device
        recv_x = torch.empty(rows_out, x.size(1), dtype=x.dtype, device=dev)
        outs = {"x": _bits(recv_x), "src": torch.empty(rows_out, dtype=torch.int32, device=dev)}
        outs["s"] = torch.empty(rows_out, S, dtype=torch.float32, device=dev) if S else None
        outs["i"] = torch.empty(rows_out, k, dtype=torch.int64, device=dev) if k else None
        outs["w"] = torch.empty(rows_out, k, dtype=torch.float32, device=dev) if has_w else None
        bufs = self._dispatch_views(cap, offs, outs["x"], S, k, has_w)
        K.dispatch_recv(bufs, outs, nv["num_recv"], rows_out, self.sig_local, self.err, epoch, R, C, MAX_CHANNELS,
                        self.flag_off, self.timeout_s, C)
        self._after_op()
        fields = list(handle)
        fields[3] = outs["src"]
        handle = DispatchHandle(tuple(fields), **handle.__dict__)
        return recv_x, outs["s"], outs["i"], outs["w"], expert_counts, handle

    def _dispatch_views(self, cap, offs, xv_like, S, k, has_w):
        b = self.buffer
        return {"x": b.local(xv_like.dtype, (cap, xv_like.size(1)), offs[0]),
                "s": b.local(torch.float32, (cap, S), offs[1]) if S else None,
                "i": b.local(torch.int64, (cap, k), offs[2]) if k else None,
                "w": b.local(torch.float32, (cap, k), offs[3]) if has_w else None,
                "src": b.local(torch.int32, (cap,), offs[4])}

    def cached_dispatch(self, x, x_scales, handle, config):
        rt = self.rt
        self._refuse_capture()
        R, me = rt.world_size, rt.rank
        nv = self._handle_tensors(handle)
        C = self._channels(config)
        xv = _bits(x)
        S = x_scales.size(1) if x_scales is not None else 0
        widths = _dispatch_widths(xv.size(1) * xv.element_size(), S, 0, False)
        cap, offs = _regions(self.buffer.nbytes, widths)
        worst = handle.num_worst_tokens
        rows_out = worst or handle.num_recv_tokens
        need = worst or handle.max_recv_tokens
        if need > cap:
            raise self._too_small(need, sum(widths), "cached dispatch", x)
        epoch = self._next_epoch()
        layout = dict(zip(("off_x", "off_s", "off_i", "off_w", "off_src"), offs))
        K.dispatch_send(xv, x_scales, None, None, handle.is_token_in_rank, handle.send_head, nv["recv_off"],
                        nv["recv_total"], self.data_ptrs, self.sig_ptrs, self.sig_local, self.err, epoch, me, R, C,
                        MAX_CHANNELS, 1, layout, cap, worst, sum(widths), self.flag_off, self.barrier_off,
                        self.timeout_s, barrier=True)
        dev = x.device
        recv_x = torch.empty(rows_out, x.size(1), dtype=x.dtype, device=dev)
        outs = {"x": _bits(recv_x), "src": torch.empty(rows_out, dtype=torch.int32, device=dev),
                "s": torch.empty(rows_out, S, dtype=torch.float32, device=dev) if S else None, "i": None, "w": None}
        bufs = self._dispatch_views(cap, offs, outs["x"], S, 0, False)
        K.dispatch_recv(bufs, outs, nv["num_recv"], rows_out, self.sig_local, self.err, epoch, R, C, MAX_CHANNELS,
                        self.flag_off, self.timeout_s, C)
        self._after_op()
        return recv_x, outs["s"]

    # ----------------------------------------------------------------- combine
    def combine(self, x, topk_weights, bias, handle, config):
        rt = self.rt
        self._refuse_capture()
        R, me = rt.world_size, rt.rank
        nv = self._handle_tensors(handle)
        C = self._channels(config)
        xv = _bits(x)
        k = topk_weights.size(1) if topk_weights is not None else 0
        widths = _combine_widths(xv.size(1) * xv.element_size(), k)
        cap, (off_x, off_w) = _regions(self.buffer.nbytes, widths)
        if handle.max_send_tokens is not None and handle.max_send_tokens > cap:
            raise self._too_small(handle.max_send_tokens, sum(widths), "combine", x)
        epoch = self._next_epoch()
        w = topk_weights.contiguous() if topk_weights is not None else None
        K.combine_send(xv, w, nv["seg_end"], nv["seg_cnt"], nv["dst_off"], nv["send_total"], self.data_ptrs,
                       self.sig_ptrs, self.sig_local, self.err, epoch, me, R, C, MAX_CHANNELS, off_x, off_w, cap,
                       sum(widths), self.flag_off, self.barrier_off, self.timeout_s)
        T, H = handle.num_tokens, x.size(1)
        out = torch.empty(T, H, dtype=x.dtype, device=x.device)
        out_w = torch.empty(T, k, dtype=torch.float32, device=x.device) if k else None
        buf_x = self.buffer.local(x.dtype, (cap, H), off_x)
        buf_w = self.buffer.local(torch.float32, (cap, k), off_w) if k else None
        K.combine_recv(buf_x, buf_w, handle.is_token_in_rank, handle.send_head, handle.send_offsets, out, out_w,
                       [b.contiguous() for b in bias], self.sig_local, self.err, epoch, R, C, MAX_CHANNELS,
                       self.flag_off, self.timeout_s, C)
        self._after_op()
        return out, out_w
