"""The low-latency MoE kernels on their own (kernels/moe_ll.py, kernels/moe_ll_place.py): simulated ranks in one
process (each "rank" a byte buffer, peer pointers their addresses), the placement and reduce kernels against the
torch reference (ll_layout.place_tokens), the in-kernel FP8 cast. Interpreter on CPU, the GPU when present.
"""
import pytest
import torch

from turbo_dist.kernels import moe_ll, moe_ll_logfmt, moe_ll_place
from turbo_dist.moe.ll_layout import pack_ue8m0, per_token_cast_back, per_token_cast_to_fp8, place_tokens
from turbo_dist.moe.low_latency import LowLatency

from test_moe_low_latency import make_inputs, ref_dispatch


def test_low_latency_kernels_simulated_ranks():
    """The triton path's kernels with R simulated ranks in one process (interpreter on CPU, GPU if present)."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    world, num_experts, num_max, hidden, k = 2, 8, 4, 128, 3
    e_l = num_experts // world
    dtype = torch.float16  # the interpreter mishandles bf16; the kernels move 4-byte words of any dtype
    inputs = [make_inputs(r, world, num_experts, "random", 5, num_max=num_max, hidden=hidden, topk=k)
              for r in range(world)]
    inputs = [(a.to(dtype), b, c) for a, b, c in inputs]
    regions, nbytes = LowLatency.layout(num_max, hidden, world, k)
    bufs = [torch.zeros(nbytes, dtype=torch.uint8, device=dev) for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=dev)
    errs = [moe_ll.ErrorWord(dev) for _ in range(world)]
    reg = regions[1]
    cnt = [b[:world * 8 * 4].view(torch.int64).view(2, 2, world) for b in bufs]
    for r in range(world):  # every rank sends (payload + FP8-like scales) before anyone receives
        x, idx, _ = inputs[r]
        scales = torch.rand(x.size(0), hidden // 128, device=dev)
        inputs[r] = inputs[r] + (scales.cpu(),)
        moe_ll.dispatch_send(x.to(dev), scales, idx.to(dev), num_max, ptrs, r, world, e_l, reg["x"], reg["s"],
                             reg["idx"], (0 * 2 + 1) * world * 8)
    slots = world * num_max
    for me in range(world):
        assert cnt[me][0, 1].tolist() == [num_max] * world
        moe_ll.wait_counters(cnt[me][0, 1], errs[me].addr, num_max, moe_ll.ERR_DISPATCH, 5.0)
        assert cnt[me][0, 1].tolist() == [0] * world and errs[me].read(sync=True)[0] == 0
        b = bufs[me]
        rows_x = b[reg["x"]:reg["x"] + slots * hidden * 2].view(dtype).view(slots, hidden)
        rows_s = b[reg["s"]:reg["s"] + slots * 4].view(torch.float32).view(slots, 1)
        all_idx = b[reg["idx"]:reg["idx"] + slots * k * 4].view(torch.int32).view(world, num_max, k)
        out_x = torch.zeros(e_l * slots + 1, hidden, dtype=dtype, device=dev)
        out_s = torch.zeros(e_l * slots + 1, 1, dtype=torch.float32, device=dev)
        count, src_info, layout_range, dst = place_tokens(rows_x, rows_s, all_idx, me, e_l, num_max, out_x, out_s)
        # the placement kernels (CUDA's path) give the torch reference's outputs bit for bit, the scales in
        # DeepEP's column-major layout, the stats accumulated
        got = _place_kernels(rows_x, rows_s, all_idx, me, e_l, ue8m0=False)
        assert torch.equal(got["x"][:e_l * slots], out_x[:-1]) and torch.equal(got["scales"], out_s[:-1].view(e_l, slots, 1))
        for name, ref_t in (("count", count), ("src_info", src_info), ("layout_range", layout_range), ("dst", dst)):
            assert torch.equal(got[name], ref_t), name
        assert torch.equal(got["stats"], 5 + count)
        ref = ref_dispatch(me, [(a, b_, c) for a, b_, c, _ in inputs], num_experts, world, num_max)
        ref_s = ref_dispatch(me, [(s_, b_, c) for _, b_, c, s_ in inputs], num_experts, world, num_max)
        for e, ((rows, src, per_src), (srows, _, _)) in enumerate(zip(ref, ref_s)):
            n = len(src)
            assert int(count[e]) == n and src_info[e, :n].tolist() == src
            assert torch.equal(out_x[e * slots:e * slots + n].cpu(), rows)
            assert torch.equal(out_s[e * slots:e * slots + n].cpu(), srows)

        # combine: experts return rows * 2; each source gets them in its [t, k] slots
        y = (got["x"][:e_l * slots] * 2).contiguous()
        moe_ll.combine_send(y, dst, ptrs, me, world, num_max, reg["comb"], (1 * 2 + 1) * world * 8)
    for me in range(world):
        assert cnt[me][1, 1].tolist() == [num_max * k] * world  # one count per (token slot, k) program
        moe_ll.wait_counters(cnt[me][1, 1], errs[me].addr, num_max * k, moe_ll.ERR_COMBINE, 5.0)
        x, idx, _, _ = inputs[me]
        t = x.size(0)
        slot_rows = bufs[me][reg["comb"]:reg["comb"] + num_max * k * hidden * 2].view(dtype).view(num_max, k, hidden)
        for j in range(k):
            sent = idx[:, j] >= 0
            assert torch.equal(slot_rows[:t][sent, j].cpu(), x[sent] * 2)
        w = inputs[me][2].to(dev)
        out = moe_ll_place.combine_reduce(slot_rows, idx.to(dev), w, torch.empty(t, hidden, dtype=dtype, device=dev))
        ref = torch.zeros(t, hidden)
        for j in range(k):
            ref += torch.where(idx[:, j:j + 1] >= 0, slot_rows[:t, j].float().cpu() * w[:, j:j + 1].cpu(), 0.0)
        assert torch.allclose(out.float().cpu(), ref.to(dtype).float(), rtol=1e-3, atol=1e-3)

    assert all(e.read(sync=True) == [0] * moe_ll.ERR_NUMEL for e in errs)

    # nobody sends: the wait gives up, records who it waited for (the lowest missing source), and does not
    # consume. The launch is asynchronous on GPU: the record is there once the kernel ran (read(sync=True)).
    cnt[0][0, 0, 1] = num_max  # source 1 arrived, source 0 did not
    cost = torch.full((world,), 7, dtype=torch.int64, device=dev)
    moe_ll.wait_counters(cnt[0][0, 0], errs[0].addr, num_max, moe_ll.ERR_DISPATCH, 1e-3, stats=cost)
    code, src, seen, expected = errs[0].read(sync=True)
    assert (code, src, seen, expected) == (moe_ll.ERR_DISPATCH, 0, 0, num_max)
    assert int(cost[0]) > 7 and int(cost[1]) == 7, "the wait cost goes to the source waited for"
    assert cnt[0][0, 0].tolist() == [0, num_max], "a wait that timed out must not consume"
    # a recorded error makes later waits return at once, consuming nothing
    moe_ll.wait_counters(cnt[0][0, 0], errs[0].addr, num_max, moe_ll.ERR_COMBINE, 60.0)
    assert errs[0].read(sync=True) == [moe_ll.ERR_DISPATCH, 0, 0, num_max] and cnt[0][0, 0].tolist() == [0, num_max]
    errs[0].clear()
    cnt[0][0, 0] = torch.tensor([num_max, 1])  # now source 1 is the one missing (one of its programs came)
    moe_ll.wait_counters(cnt[0][0, 0], errs[0].addr, num_max, moe_ll.ERR_COMBINE, 1e-3)
    assert errs[0].read(sync=True) == [moe_ll.ERR_COMBINE, 1, 1, num_max]


def _place_kernels(rows_x, rows_s, all_idx, me, e_l, ue8m0):
    """kernels/moe_ll_place.place into fresh outputs (stats starting at 5, scales column-major as DeepEP's)."""
    dev = rows_x.device
    n = all_idx.size(0) * all_idx.size(1)
    g = (rows_s.size(1) // 4 if ue8m0 else rows_s.size(1)) if rows_s is not None else 1
    out = {"x": torch.zeros(e_l * n + 1, rows_x.size(1), dtype=rows_x.dtype, device=dev),
           "scales": torch.zeros(e_l, g, n, dtype=torch.int32 if ue8m0 else torch.float32, device=dev).transpose(1, 2),
           "count": torch.empty(e_l, dtype=torch.int32, device=dev),
           "src_info": torch.empty(e_l, n, dtype=torch.int32, device=dev),
           "layout_range": torch.empty(e_l, all_idx.size(0), dtype=torch.int64, device=dev),
           "dst": torch.empty(n, all_idx.size(2), dtype=torch.int64, device=dev),
           "stats": torch.full((e_l,), 5, dtype=torch.int32, device=dev)}
    moe_ll_place.place(rows_x, rows_s, all_idx, me, e_l, out["x"], out["scales"], ue8m0, out["count"], out["src_info"],
                       out["layout_range"], out["dst"], out["stats"])
    return out


@pytest.mark.parametrize("world,num_max,k,routing", [(2, 8, 3, "random"), (3, 5, 4, "skewed"), (2, 4, 2, "repeat"),
                                                       (1, 3, 2, "all_dropped")])
def test_place_kernels_match_torch_reference(world, num_max, k, routing):
    """kernels/moe_ll_place.place == ll_layout.place_tokens (torch), incl. UE8M0 packing, tokens repeating an
    expert (more entries than slots: dropped the same way), empty slots; interpreter on CPU, GPU if present."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    e_l, hidden, groups = 3, 64, 8
    g = torch.Generator().manual_seed(world * 100 + num_max)
    idx = torch.randint(-1, world * e_l, (world, num_max, k), generator=g)
    if routing == "skewed":
        idx[:, :, 0] = e_l  # rank 1's first expert
    if routing == "repeat":  # every entry on expert 1 of rank 0: 2x more entries than its slots
        idx.fill_(1)
    if routing == "all_dropped":
        idx.fill_(-1)
    rows_x = torch.randn(world * num_max, hidden, generator=g).to(torch.float16)
    rows_s = torch.exp2(torch.randint(-8, 8, (world * num_max, groups), generator=g).float())  # pow-2, as UE8M0 needs
    for me in range(world):
        n = world * num_max
        out_x = torch.zeros(e_l * n + 1, hidden, dtype=torch.float16)
        out_s = torch.zeros(e_l * n + 1, groups)
        ref = place_tokens(rows_x, rows_s, idx, me, e_l, num_max, out_x, out_s)
        for ue8m0 in (False, True):
            got = _place_kernels(rows_x.to(dev), rows_s.to(dev), idx.to(dev).int(), me, e_l, ue8m0)
            for name, r in zip(("count", "src_info", "layout_range", "dst"), ref):
                assert torch.equal(got[name].cpu(), r), (name, got[name].cpu(), r)
            cnt = ref[0]
            for e in range(e_l):
                c = int(cnt[e])
                assert torch.equal(got["x"][e * n:e * n + c].cpu(), out_x[e * n:e * n + c])
                s_ref = out_s[e * n:e * n + c]
                want = pack_ue8m0(s_ref) if ue8m0 else s_ref
                assert torch.equal(got["scales"][e, :c].cpu(), want)
            assert torch.equal(got["stats"].cpu(), 5 + cnt)


@pytest.mark.gpu(min_gpus=1)
def test_fused_fp8_cast_in_send_kernel_bit_identical():
    """The send kernel's in-kernel FP8 cast (the triton path's) == per_token_cast_to_fp8, round_scale too."""
    dev = torch.device("cuda")
    t, hidden, k, num_max = 5, 384, 2, 6
    x32 = (torch.randn(t, hidden, generator=torch.Generator().manual_seed(3)) * 3).to(dev)
    x32[1, :128] = 0  # an all-zero group: the 1e-4 floor
    idx = torch.zeros(t, k, dtype=torch.int64, device=dev)
    regions, nbytes = LowLatency.layout(num_max, hidden, 1, k)
    reg = regions[0]
    for round_scale, dtype in ((False, torch.bfloat16), (True, torch.bfloat16), (False, torch.float32)):
        x = x32.to(dtype)  # fp32 x (allowed by low_latency_dispatch) is cast in the kernel too
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
        ptrs = torch.tensor([buf.data_ptr()], dtype=torch.int64, device=dev)
        moe_ll.dispatch_send(x, None, idx, num_max, ptrs, 0, 1, 1, reg["x"], reg["s"], reg["idx"], 0,
                             cast_fp8=True, round_scale=round_scale)
        q_ref, s_ref = per_token_cast_to_fp8(x, round_scale)
        q = buf[reg["x"]:reg["x"] + t * hidden].view(t, hidden)
        s = buf[reg["s"]:reg["s"] + t * 3 * 4].view(torch.float32).view(t, 3)
        assert torch.equal(s, s_ref), (round_scale, dtype)
        assert torch.equal(q, q_ref.view(torch.uint8)), (round_scale, dtype)
        assert buf[:8].view(torch.int64).item() == num_max  # one release per program (t slots + empty ones)


@pytest.mark.gpu(min_gpus=1)
def test_fp8_casts_bit_identical_on_cpu_and_gpu():
    """The tests quantize their references on the CPU and the ranks quantize on their GPU: both casts (the
    library's and test_moe.to_fp8) must give the same bits on either device (a `/ 448.0` would not: CUDA
    multiplies by the reciprocal of a CPU-scalar divisor)."""
    from test_moe import to_fp8

    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 3
    for name, cast in (("per_token_cast_to_fp8", per_token_cast_to_fp8),
                       ("round_scale", lambda t: per_token_cast_to_fp8(t, round_scale=True)), ("to_fp8", to_fp8)):
        q_cpu, s_cpu = cast(x)
        q_gpu, s_gpu = cast(x.cuda())
        assert torch.equal(s_gpu.cpu(), s_cpu), f"{name}: scales differ between CPU and GPU"
        assert torch.equal(q_gpu.cpu().view(torch.uint8), q_cpu.view(torch.uint8)), f"{name}: fp8 bits differ"
        assert torch.equal(per_token_cast_back(q_gpu, s_gpu).cpu(), per_token_cast_back(q_cpu, s_cpu))


def test_logfmt_codec_and_kernels():
    """LogFMT (use_logfmt): the torch codec round-trips within its bound (2 ** (step / 2) - 1 per value, zeros
    exact); the send kernel encodes as the codec does (codes bit for bit under the interpreter; the GPU's log2 is an
    approximation, so there the decoded values are compared); the reduce kernel decodes, weights and sums."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    rows, hidden, k, num_max = 6, 1280, 2, 3  # 20 groups: a full and a partial 16-group tile per row
    y = (torch.randn(rows, hidden, generator=g) * torch.exp(torch.randn(rows, hidden, generator=g) * 2)).half()
    y[0, :64] = 0      # an all-zero group
    y[1, 64:128] = 0.5  # a constant group (step 0)
    y[2, 5] = -0.0
    words = moe_ll_logfmt.logfmt_encode(y)
    dec = moe_ll_logfmt.logfmt_decode(words, hidden)
    meta = words[:, :, moe_ll_logfmt.GROUP_WORDS - 2:].contiguous().view(torch.float32)
    step = meta[:, :, 1]
    bound = (torch.exp2(step / 2) - 1).repeat_interleave(moe_ll_logfmt.GROUP, 1) * 1.001 + 1e-6
    floor = torch.exp2(meta[:, :, 0]).repeat_interleave(moe_ll_logfmt.GROUP, 1)  # below: sent as zero (the clip)
    yf = y.float()
    flushed = (dec == 0) & (yf != 0)
    assert ((dec - yf).abs() <= bound * yf.abs())[~flushed].all()
    assert (yf.abs() <= floor)[flushed].all()
    assert (dec[yf == 0] == 0).all() and torch.equal(dec[1, 64:128], yf[1, 64:128])
    assert words.shape == (rows, hidden // 64, 22) and moe_ll_logfmt.row_bytes(hidden) == hidden // 64 * 88

    regions, nbytes = LowLatency.layout(num_max, hidden, 1, k)
    buf = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
    ptrs = torch.tensor([buf.data_ptr()], dtype=torch.int64, device=dev)
    dst = torch.tensor([[0, 1], [2, -1], [3, 4]], dtype=torch.int64, device=dev)  # slot (t, k) <- row of y
    moe_ll_logfmt.combine_send(y.to(dev), dst, ptrs, 0, 1, num_max, regions[0]["comb"], 0)
    assert buf[:8].view(torch.int64).item() == num_max * k
    rb = moe_ll_logfmt.row_bytes(hidden)
    slots = buf[regions[0]["comb"]:regions[0]["comb"] + num_max * k * rb].view(torch.int32)
    slots = slots.view(num_max, k, hidden // 64, moe_ll_logfmt.GROUP_WORDS)
    for t in range(num_max):
        for j in range(k):
            r = int(dst[t, j])
            if r < 0:
                continue
            got = slots[t, j].cpu()
            if dev.type == "cpu":  # codes bit for bit; lmin / step within an ulp (numpy's log2 against torch's)
                nc = moe_ll_logfmt.GROUP_WORDS - 2
                assert torch.equal(got[:, :nc], words[r][:, :nc])
                torch.testing.assert_close(got[:, nc:].view(torch.float32), words[r][:, nc:].view(torch.float32),
                                           rtol=1e-6, atol=0)
            d = moe_ll_logfmt.logfmt_decode(got[None], hidden)[0]
            ok = (d - yf[r]).abs() <= 2.5 * bound[r] * yf[r].abs() + 1e-6
            assert (ok | ((d == 0) & (yf[r].abs() <= floor[r] * 1.01))).all()
    wt = torch.rand(num_max, k, generator=g)
    out = moe_ll_logfmt.combine_reduce(slots, dst, wt.to(dev), torch.empty(num_max, hidden, dtype=torch.float16,
                                                                          device=dev))
    ref = torch.zeros(num_max, hidden)
    for j in range(k):
        rows_j = moe_ll_logfmt.logfmt_decode(slots[:, j].cpu(), hidden)
        ref += torch.where(dst[:, j:j + 1].cpu() >= 0, rows_j * wt[:, j:j + 1], 0.0)
    torch.testing.assert_close(out.float().cpu(), ref.half().float(), rtol=2e-3, atol=1e-3)


def test_logfmt_clips_its_range_to_32_octaves():
    """A group's range ends LOG_RANGE (32) octaves below its largest magnitude: a tiny value beside large ones (a
    cancellation's 1e-30 beside a 1) is sent as zero instead of widening the step for the whole group (without the
    clip: 100 octaves over 510 steps, 7% error on every value; with it at most 2 ** (32 / 1020) - 1 = 2.2%); a
    value inside the range is kept; a group spanning less than 32 octaves is unchanged by the clip."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 64, generator=g) + 0.5   # 0.5 .. 1.5
    x[0, 3] = 1e-30                            # ~100 octaves below: flushed
    x[1, 3] = -2.0 ** -30                      # inside the 32 octaves below 1.5: kept, sign and all
    x[2, 3] = 2.0 ** -10                       # an 11-octave group: the clip does not touch it
    words = moe_ll_logfmt.logfmt_encode(x)
    dec = moe_ll_logfmt.logfmt_decode(words, 64)
    lmin, step = words.view(torch.float32)[:, 0, 20], words.view(torch.float32)[:, 0, 21]
    lmax = torch.log2(x.abs().amax(1))
    assert dec[0, 3] == 0 and dec[1, 3] < 0
    torch.testing.assert_close(lmin[0], lmax[0] - moe_ll_logfmt.LOG_RANGE, rtol=0, atol=1e-5)  # clipped
    torch.testing.assert_close(lmin[1:], torch.tensor([-30.0, -10.0]), rtol=0, atol=1e-6)  # the smallest kept
    assert (step <= moe_ll_logfmt.LOG_RANGE / 510 + 1e-6).all()
    kept = dec != 0
    rel = ((dec - x).abs() / x.abs())[kept]
    assert rel.max() <= 2.0 ** (moe_ll_logfmt.LOG_RANGE / 1020) - 1 + 1e-4
    assert (dec[0, :3] - x[0, :3]).abs().max() / x[0, :3].abs().max() < 0.03


def test_masked_ranks_and_shrink_on_timeout():
    """Buffer(enable_shrink=True)'s kernel side, three simulated ranks, rank 2 dead: a masked destination gets no
    store (not even the counter), a masked source is not waited for nor consumed, and a wait that times out masks
    the sources still short, consumes the complete ones and records no error (DeepEP's shrink)."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    world, num_experts, num_max, hidden, k = 3, 6, 2, 128, 2
    e_l = num_experts // world
    regions, nbytes = LowLatency.layout(num_max, hidden, world, k)
    reg = regions[0]
    bufs = [torch.zeros(nbytes, dtype=torch.uint8, device=dev) for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=dev)
    masks = [torch.tensor([0, 0, 1], dtype=torch.int32, device=dev) for _ in range(world)]
    errs = [moe_ll.ErrorWord(dev) for _ in range(world)]
    cnt = [b[:world * 8 * 4].view(torch.int64).view(2, 2, world) for b in bufs]
    idx = torch.tensor([[0, 5], [4, 2]], dtype=torch.int64, device=dev)  # both tokens hit rank 2's experts
    x = torch.randn(2, hidden, device=dev).half()
    for r in (0, 1):
        moe_ll.dispatch_send(x, None, idx, num_max, ptrs, r, world, e_l, reg["x"], reg["s"], reg["idx"], 0,
                             mask=masks[r])
    assert not bufs[2].any(), "a masked destination must get no store"
    for r in (0, 1):
        assert cnt[r][0, 0].tolist() == [num_max, num_max, 0]
        moe_ll.wait_counters(cnt[r][0, 0], errs[r].addr, num_max, moe_ll.ERR_DISPATCH, 5.0, mask=masks[r])
        assert cnt[r][0, 0].tolist() == [0, 0, 0] and errs[r].read(sync=True)[0] == 0
    # combine back: rank 0 returns rows to sources 0 and 1 (dst rows 0, 1) and to the masked source 2
    y = torch.randn(4, hidden, device=dev).half()
    dst = torch.tensor([[0, -1], [1, -1], [-1, -1], [-1, -1], [2, 3], [-1, -1]], dtype=torch.int64, device=dev)
    moe_ll.combine_send(y, dst, ptrs, 0, world, num_max, reg["comb"], (1 * 2) * world * 8, mask=masks[0])
    assert not bufs[2].any() and cnt[0][1, 0, 0] == num_max * k and cnt[1][1, 0, 0] == num_max * k
    moe_ll_logfmt.combine_send(torch.randn(4, 128, device=dev).half(), dst, ptrs, 0, world, num_max,
                               reg["comb"], (1 * 2 + 1) * world * 8, mask=masks[0])
    assert not bufs[2].any() and cnt[1][1, 1, 0] == num_max * k

    # shrink: rank 0 unmasks everyone and waits; source 1 has arrived, source 2 never will
    masks[0].zero_()
    cnt[0][0, 1] = torch.tensor([num_max, num_max, 1], device=dev)
    moe_ll.wait_counters(cnt[0][0, 1], errs[0].addr, num_max, moe_ll.ERR_DISPATCH, 1e-3, mask=masks[0])
    assert masks[0].tolist() == [0, 0, 1], "the late source is masked"
    assert errs[0].read(sync=True)[0] == 0, "shrink records no error"
    assert cnt[0][0, 1].tolist() == [0, 0, 1], "complete sources consumed, the masked one left as it was"
    # later waits skip it
    cnt[0][0, 1, :2] = num_max
    moe_ll.wait_counters(cnt[0][0, 1], errs[0].addr, num_max, moe_ll.ERR_DISPATCH, 5.0, mask=masks[0])
    assert cnt[0][0, 1].tolist() == [0, 0, 1] and masks[0].tolist() == [0, 0, 1]


def test_wait_traps_only_when_captured_without_mask(monkeypatch):
    """A captured wait (CUDA graph: no host code runs at a replay to raise) traps on a timeout instead of returning
    what arrived; eager waits record and the next call raises; a rank mask (enable_shrink) masks instead."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert moe_ll.traps_on_timeout(True, None)
    assert not moe_ll.traps_on_timeout(True, torch.zeros(2, dtype=torch.int32))
    assert not moe_ll.traps_on_timeout(False, None)  # no GPU timer (interpreter): never
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not moe_ll.traps_on_timeout(True, None)


def test_timeout_record_is_printed_at_exit():
    """A trapped replay leaves a CUDA error naming nothing of ours: the record is printed when the process exits."""
    import subprocess
    import sys

    code = ("import torch\nfrom turbo_dist.kernels import moe_ll\n"
            "w = moe_ll.ErrorWord(torch.device('cpu'))\nw.tensor.copy_(torch.tensor([moe_ll.ERR_COMBINE, 3, 5, 8]))\n"
            "clear = moe_ll.ErrorWord(torch.device('cpu'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "turbo_dist low-latency" in ln]
    assert len(lines) == 1, out.stderr  # the clear record prints nothing
    assert "combine: the wait for rank 3 timed out (its counter 5 of 8)" in lines[0]
    assert "not cleared" in lines[0] and "trapped" not in lines[0]
    assert "CUDA graph trapped" in moe_ll.describe([moe_ll.ERR_DISPATCH | moe_ll.TRAPPED, 1, 0, 4])
    assert moe_ll.describe([0, 0, 0, 0]) is None
