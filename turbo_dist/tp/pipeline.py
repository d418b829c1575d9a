"""Chunked all-gather / reduce-scatter pipelines over the runtime's symmetric buffers (CUDA, peer access).

All-gather (pull): every rank copies its shard into its half of a double-buffered symmetric buffer
and raises READY in every peer's signal pad. The comm stream then pulls peer shards in ring order
(rank+1, rank+2, ...: every step is a permutation, so no link is shared) with copy-engine copies,
each gated by a bounded wait on that peer's READY flag; the compute stream runs the consumer (the
GEMM) on the local shard at once and on each peer chunk as soon as its copy's event fires. A reader
raises DONE in the owner's pad after its copy, so the owner only overwrites that half two calls
later once every reader is through ("direct" order: all copies at once, then one consumer call).

Reduce-scatter (push): the compute stream produces the partial for rank+1, rank+2, ... (the GEMM
of the rows that rank owns), the comm stream copies each one into that rank's receive slot as soon
as it is produced and raises READY there; the own partial is produced last, hiding the last copy.
Each rank then waits for all READY flags and reduces the W slots in fp32.

Signals are epochs (call counters), never reset; see turbo_dist/kernels/tp_signal.py.

Buffer halves: the half a call uses is fixed by its epoch's parity and the buffer's capacity
(`half_base`), never by the call's own size. Two calls of different shapes therefore never share
bytes unless they share a parity, and a call only waits for the readers of the call two epochs
back (the previous user of its half). The pure schedule/layout helpers below (`ring_peers`,
`half_base`, `packed_offsets`) are what the pipelines use; tests check them for many world sizes.
"""
import logging
import weakref

import torch

from turbo_dist.kernels import tp_signal
from turbo_dist.runtime import config

log = logging.getLogger("turbo_dist")

MAX_RANKS = 256
CH_AG_READY, CH_AG_DONE, CH_RS_READY, CH_RS_DONE = range(4)
_SIG_SLOTS = 4 * MAX_RANKS
_ALIGN = 256

_STATES = weakref.WeakKeyDictionary()

# The stream/event API the pipelines use. A seam for tests only: tests/test_tp_schedule.py swaps it
# (and `tp_signal`) for in-process fakes to run the real schedule with W simulated ranks on CPU.
_cuda = torch.cuda


def _align(n):
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# ------------------------------------------------------------------------ schedule and layout
def ring_peers(rank, world_size):
    """Peers in pipeline order: rank+1, rank+2, ..., rank+W-1 (mod W). At step i every rank talks to
    rank+i, a permutation of the ranks, so no two ranks pull from (or push to) the same peer at once."""
    return [(rank + step) % world_size for step in range(1, world_size)]


def half_capacity(buf_nbytes):
    """Bytes of one half of a double-buffered symmetric buffer of `buf_nbytes` (aligned down)."""
    return (buf_nbytes // 2) // _ALIGN * _ALIGN


def half_base(epoch, buf_nbytes):
    """Byte offset of the half that call `epoch` uses: by parity, at a fixed capacity.

    Using the call's own size as the half (base = (epoch % 2) * size) makes consecutive calls of
    different sizes overlap (e.g. [256, 512) then [0, 1024)), clobbering bytes peers still read.
    """
    return (epoch % 2) * half_capacity(buf_nbytes)


def packed_offsets(nbytes, base):
    """Aligned byte offsets of consecutive regions of `nbytes[i]` bytes from `base`; also the total."""
    offs, off = [], base
    for n in nbytes:
        offs.append(off)
        off += _align(n)
    return offs, off - base


class TPState:
    """Per-runtime pipeline state: the signal pad, epoch counters, data buffers, the error record."""

    def __init__(self, rt):
        if rt.world_size > MAX_RANKS:
            raise NotImplementedError(f"async TP pipelines support up to {MAX_RANKS} ranks, got {rt.world_size}")
        self.rt = rt
        self.sig = rt.symm_buffer("tp_signal", _SIG_SLOTS * 4)
        self.pad = self.sig.local(torch.int32, (_SIG_SLOTS,))
        self.pad_ptrs = self.sig.peer_ptrs
        self.err = torch.zeros(tp_signal.ERR_NUMEL, dtype=torch.int32, device=rt.device)
        self.err_host = torch.zeros(tp_signal.ERR_NUMEL, dtype=torch.int32, pin_memory=rt.device.type == "cuda")
        self.err_event = None
        self.epochs = {"ag": 0, "rs": 0}
        self.bufs = {}
        self.timeout_s = config.peer_timeout_s()
        _cuda.synchronize(rt.device)  # the pad's zeroing (stream-ordered) is done here...
        rt.barrier()  # ...on every rank before anyone signals into it

    # ---- buffers
    def buffer(self, name, nbytes):
        buf = self.bufs.get(name)
        if buf is not None and buf.nbytes >= nbytes:
            return buf
        if buf is not None:
            # Growing frees the old allocation, which peers may still be reading: drain everyone first.
            _cuda.synchronize(self.rt.device)
            self.rt.barrier()
        buf = self.rt.symm_buffer(name, nbytes)
        # The allocation zeroes the new buffer on this rank's current stream; a peer pushing into it
        # (reduce-scatter) must not land before that zeroing: finish it on every rank first.
        _cuda.synchronize(self.rt.device)
        self.rt.barrier()
        self.bufs[name] = buf
        return buf

    def next_epoch(self, kind):
        self.epochs[kind] += 1
        return self.epochs[kind]

    # ---- signals (stream-ordered on the current stream)
    def signal(self, channel, value, first_peer, num_peers):
        """Raise my slot of `channel` to `value` in the pads of num_peers ranks from first_peer."""
        rt = self.rt
        tp_signal.put_signal(self.pad_ptrs, channel * MAX_RANKS + rt.rank, value, first_peer, num_peers,
                             rt.world_size)

    def wait(self, channel, value, first_peer, num_peers):
        """Wait until the slots of num_peers ranks from first_peer in my `channel` reach `value`."""
        if value <= 0:
            return
        tp_signal.wait_signal(self.pad, self.err, channel * MAX_RANKS, value, first_peer, num_peers,
                              self.rt.world_size, self.timeout_s)

    # ---- errors
    def record_errors(self, stream):
        with _cuda.stream(stream):
            self.err_host.copy_(self.err, non_blocking=True)
            self.err_event = _cuda.Event()
            self.err_event.record(stream)

    def check_errors(self, block=False):
        """Raise if a wait of an earlier call timed out (non-blocking unless `block`)."""
        ev = self.err_event
        if ev is None:
            return
        if block:
            ev.synchronize()
        elif not ev.query():
            return
        msg = tp_signal.describe_error(self.err_host.tolist(), self.timeout_s)
        if msg is not None:
            # raised once per recorded timeout: the record is cleared, so a later call runs (and raises again if
            # the peers are still out of step) instead of every call failing on this one for good
            self.err.zero_()
            self.err_host.zero_()
            self.err_event = None
            raise RuntimeError(f"turbo_dist.tp (rank {self.rt.rank}): {msg} The output of the call whose wait "
                               "timed out is invalid.")


def get_state(rt):
    state = _STATES.get(rt)
    if state is None:
        state = TPState(rt)
        _STATES[rt] = state
    state.check_errors()
    return state


def check_errors(rt, block=True):
    state = _STATES.get(rt)
    if state is not None:
        state.check_errors(block=block)


# ------------------------------------------------------------------------------------ all-gather
def all_gather_consume(rt, shards, consume, consume_all=None, order="ring", gathered=None):
    """Gather `shards` (list of 2-D contiguous [m_i, k_i] tensors, same m_i on every rank) along dim 0,
    calling `consume(chunks, src)` on the compute stream for every rank's chunk as soon as it is here.

    order "direct": gather everything, then `consume_all(gathered)` once (or `consume` per rank if
    consume_all is None). gathered: optional preallocated [W * m_i, k_i] outputs. Returns `gathered`.
    """
    state = get_state(rt)
    w, p = rt.world_size, rt.rank
    _, half = packed_offsets([s.numel() * s.element_size() for s in shards], 0)
    buf = state.buffer("tp_ag", 2 * half)
    e = state.next_epoch("ag")
    offs, _ = packed_offsets([s.numel() * s.element_size() for s in shards], half_base(e, buf.nbytes))
    if gathered is None:
        gathered = [s.new_empty(w * s.shape[0], *s.shape[1:]) for s in shards]
    chunks = [[g[r * s.shape[0]:(r + 1) * s.shape[0]] for s, g in zip(shards, gathered)] for r in range(w)]

    compute, comm = _cuda.current_stream(), rt.comm_stream
    comm.wait_stream(compute)
    with _cuda.stream(comm):
        state.wait(CH_AG_DONE, e - 2, 0, w)  # every reader is through with this half (two calls ago)
        for s, off in zip(shards, offs):
            buf.local(s.dtype, s.shape, off).copy_(s)
        state.signal(CH_AG_READY, e, 0, w)

    def pull(src):
        state.wait(CH_AG_READY, e, src, 1)
        for s, off, dst in zip(shards, offs, chunks[src]):
            dst.copy_(buf.peer(src, s.dtype, s.shape, off))
        state.signal(CH_AG_DONE, e, src, 1)

    if order == "ring":
        consume(shards, p)  # own rows need no communication
        for src in ring_peers(p, w):
            with _cuda.stream(comm):
                pull(src)
                landed = _cuda.Event()
                landed.record(comm)
            compute.wait_event(landed)
            consume(chunks[src], src)
        with _cuda.stream(comm):
            state.signal(CH_AG_DONE, e, p, 1)
            for s, dst in zip(shards, chunks[p]):
                dst.copy_(s)
    elif order == "direct":
        with _cuda.stream(comm):
            for src in ring_peers(p, w):
                pull(src)
            state.signal(CH_AG_DONE, e, p, 1)
            for s, dst in zip(shards, chunks[p]):
                dst.copy_(s)
        compute.wait_stream(comm)
        if consume_all is not None:
            consume_all(gathered)
        else:
            for src in range(w):
                consume(chunks[src], src)
    else:
        raise ValueError(f"unknown all-gather order {order!r}")
    compute.wait_stream(comm)
    state.record_errors(comm)
    return gathered


# -------------------------------------------------------------------------------- reduce-scatter
def produce_reduce_scatter(rt, produce, m, n, dtype, reduce_op, out_dtype, order="ring", produce_all=None):
    """Reduce-scatter of partials produced per destination: `produce(dst)` -> [m, n] `dtype` partial of
    the rows rank `dst` owns (on the compute stream). Returns this rank's [m, n] reduction (fp32
    accumulation, then `out_dtype`; 'avg' divides by W).

    order "direct": `produce_all()` -> [W * m, n] (rank-major) in one GEMM, then every push at once.
    """
    state = get_state(rt)
    w, p = rt.world_size, rt.rank
    slot_nbytes = m * n * stacked_itemsize(dtype)
    _, half = packed_offsets([slot_nbytes] * w, 0)
    buf = state.buffer("tp_rs", 2 * half)
    e = state.next_epoch("rs")
    slot_offs, _ = packed_offsets([slot_nbytes] * w, half_base(e, buf.nbytes))

    def slot_view(rank_buf, src):
        return buf.peer(rank_buf, dtype, (m, n), slot_offs[src])

    compute, comm = _cuda.current_stream(), rt.comm_stream
    keep = []
    comm.wait_stream(compute)
    with _cuda.stream(comm):
        state.wait(CH_RS_DONE, e - 2, 0, w)  # every receiver has reduced this half (two calls ago)

    def push(dst, part):
        slot_view(dst, p).copy_(part)
        state.signal(CH_RS_READY, e, dst, 1)

    if order == "ring":
        for dst in ring_peers(p, w):
            part = produce(dst)
            keep.append(part)
            made = _cuda.Event()
            made.record(compute)
            comm.wait_event(made)
            with _cuda.stream(comm):
                push(dst, part)
        own = produce(p)
    elif order == "direct":
        full = produce_all()
        keep.append(full)
        comm.wait_stream(compute)
        with _cuda.stream(comm):
            for dst in ring_peers(p, w):
                push(dst, full[dst * m:(dst + 1) * m])
        own = full[p * m:(p + 1) * m]
    else:
        raise ValueError(f"unknown reduce-scatter order {order!r}")

    # The own partial goes into the own slot so one fp32 reduction covers all W slots.
    slot_view(p, p).copy_(own)
    with _cuda.stream(comm):
        state.signal(CH_RS_READY, e, p, 1)
        state.wait(CH_RS_READY, e, 0, w)
    compute.wait_stream(comm)
    stacked = (buf.local(dtype, (w, m, n), slot_offs[0]) if _align(slot_nbytes) == slot_nbytes
               else torch.stack([slot_view(p, r) for r in range(w)]))
    acc = torch.sum(stacked, dim=0, dtype=torch.float32)
    if reduce_op == "avg":
        acc.div_(w)
    out = acc.to(out_dtype)
    state.signal(CH_RS_DONE, e, 0, w)  # after the reduction on the compute stream: slots reusable
    comm.wait_stream(compute)
    state.record_errors(comm)
    del keep  # partials were read on the comm stream, which the compute stream has waited for
    return out


def stacked_itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()
