// Weight gradient of the bf16 grouped GEMM (MoE experts) for Hopper (sm_90a), backend "wgmma" of
// grouped_gemm_wgrad (turbo_dist/ops/grouped_wgmma.py): out[g] = x[rows of g]^T @ y[rows of g] with x [M, P] and
// y [M, Q] row-major, out [G, P, Q] (P x Q row-major per group); the group boundaries are read on the GPU.
//
// The reduction runs over a group's rows, so both operands are MN-major: TMA boxes of 64 rows x 64 elements
// (128-byte lines, 128-byte swizzle), 2 boxes of x (128 P) and 4 of y (256 Q) per 64-row stage, three stages; the
// consumers' WGMMA m64n256k16 reads both transposed (x^T as A, y as B). A group's rows start anywhere, so its last
// stage may hold the next group's rows (or zeros past M): only its 16-row WGMMA steps holding rows of the group
// are multiplied, and the lines past the group's end inside the last of them are zeroed in both operands before the
// WGMMA (whole 128-byte lines: the swizzle permutes 16-byte units within a line), so no value of another group,
// not even an inf or NaN, reaches the sum. Tiles are 128 P x 256 Q of one group (ceil(rows / 64) stages each, one
// empty stage for a group without rows, whose gradient is zero); their costs follow the groups' row counts, so with
// one CTA per tile they are handed out at run time by an atomic counter (the first wave by block index). A tile
// reduces only 2-4 stages at 128-256 rows per group, so the hand-off between tiles is kept off the consumers'
// path: the producer claims the next tile while it issues the current one's stages and passes (tile, the group's
// rows) in shared memory with the tile's first stage (info), so the consumers never wait on global memory between
// tiles; -1 there ends the walk. Epilogue: a TMA store (stage_out).
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

namespace {

constexpr int kStepRows = 64;                 // a group's rows (the reduction) per stage
constexpr int kStagesW = 3;                   // three stages: the fourth's 48 KB hold the bf16 output tile
constexpr int kChunkW = kStepRows * 128;      // one box: 64 rows x 128 bytes (64 bf16), 8 KB
constexpr int kXBytes = (kBM / 64) * kChunkW;  // 128 P: 16 KB
constexpr int kYBytes = (kBN / 64) * kChunkW;  // 256 Q: 32 KB
using SmemW = StageSmem<kStagesW, kXBytes, kYBytes>;
constexpr int kOutBytes = kBM * kBN * 2;       // the bf16 tile staged for its TMA store: 4 boxes of 64 columns
constexpr int kSmemBytesW = SmemW::kBytes + kSmemAlign + kOutBytes + 16 * kStagesW;

// The epilogue: the consumers write the tile in bf16 to shared memory, in the 128-byte swizzle of map_out's boxes
// (128 rows x 64 columns each), and one thread stores it by TMA, which drains while the next tile's WGMMAs run (with
// direct 16-byte stores from registers the kernel ran at ~0.35 of peak at ~256 rows per group: each tile's 64 KB
// took about as long as its 4 stages of WGMMA, in series; benchmarks/results/probe_grouped_wgrad_plain_h200.json).
// Rows past P and columns past Q are not written (map_out is [G][P][Q]).
__device__ __forceinline__ void stage_out(const float (&acc)[2][64], uint8_t* out_smem, int c, int warp, int lane) {
  const int q = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int g = 0; g < 4; ++g) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4 chunk = quad_chunk(acc[r], g, h, q);
        const int row = c * 64 + warp * 16 + lane / 4 + 8 * h;  // in the tile
        const int col8 = r * 16 + 4 * g + q;                     // 8-column chunk in the tile, 0 .. 31
        const int box = col8 / 8, unit = (col8 % 8) ^ (row % 8);
        *reinterpret_cast<uint4*>(out_smem + box * (kBM * 128) + row * 128 + unit * 16) = chunk;
      }
    }
  }
}

// The same tile by stmatrix (STSM, opt-in: not yet run on a GPU): per warp its 16 rows x 256 columns as 16 stores of
// four 8x8 matrices (two n8 blocks x both 8-row halves), straight from the accumulator layout: no shuffles
// (stage_out's quad_chunk: 3 per 16-byte chunk) and one instruction per 4 x 16 bytes. Meant to be bit-equal to
// stage_out (the same bf16 values at the same addresses; the GPU test checks it). The tile's epilogue is ~27% of the
// consumers' stall samples (ncu, G=32 x 256 fc1).
__device__ __forceinline__ void stage_out_stsm(const float (&acc)[2][64], uint8_t* out_smem, int c, int warp,
                                               int lane) {
  const int q = lane / 8;                                     // the matrix whose row address this lane gives
  const int row = c * 64 + warp * 16 + 8 * (q % 2) + lane % 8;  // in the tile
  const uint32_t base = smem_addr(out_smem) + row * 128;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int j = 0; j < 16; j += 2) {  // n8 blocks j, j+1 of acc[r] (columns r*128 + 8j ..)
      const int col8 = r * 16 + j + q / 2;
      const uint32_t addr = base + (col8 / 8) * (kBM * 128) + (((col8 % 8) ^ (row % 8)) * 16);
      stmatrix_x4(addr, pack_bf16(acc[r][4 * j], acc[r][4 * j + 1]), pack_bf16(acc[r][4 * j + 2], acc[r][4 * j + 3]),
                  pack_bf16(acc[r][4 * j + 4], acc[r][4 * j + 5]), pack_bf16(acc[r][4 * j + 6], acc[r][4 * j + 7]));
    }
  }
}

struct ArgsW {
  const int64_t* offs;  // cumulative group ends [G]
  __nv_bfloat16* out;   // out[g * out_group + p * ldo + q]
  int* counter;         // tiles handed out past the first wave, zeroed before the launch
  int64_t out_group, ldo;
  int M, P, Q, G;
};

// A group's last stage: lines from .. to-1 (rows past the group's end inside its last 16-row WGMMA step) of `boxes`
// consecutive 64-line boxes from `base` zeroed, whole 128-byte lines (the swizzle permutes 16-byte units within a
// line), by `threads` threads (tid).
__device__ __forceinline__ void zero_lines(uint8_t* base, int boxes, int from, int to, int tid, int threads) {
  const int lines = to - from;
  for (int u = tid; u < boxes * lines * 8; u += threads) {  // 16-byte units
    const int box = u / (lines * 8), rem = u - box * lines * 8;
    *reinterpret_cast<uint4*>(base + box * kChunkW + (from + rem / 8) * 128 + (rem % 8) * 16) =
        make_uint4(0, 0, 0, 0);
  }
}

// One stage's WGMMAs for warpgroup c (x's box c as A, y's 4 boxes as B): its first N16 steps of 16 rows (a group's
// last stage: the steps holding its rows; the rest of the stage is never read).
template <int N16>
__device__ __forceinline__ void stage_mma(float (&acc)[2][64], uint8_t* xs, uint8_t* ys, int c) {
#pragma unroll
  for (int kk = 0; kk < N16; ++kk) {  // 16 rows per WGMMA: 16 lines of 128 bytes further
    const uint64_t desc_a = smem_desc_mn(xs + c * kChunkW + kk * 16 * 128, kChunkW, 1024);
    const uint64_t desc_b = smem_desc_mn(ys + kk * 16 * 128, kChunkW, 1024);
    mma_64x256x16_bf16<true, true>(acc, desc_a, desc_b, 1);
  }
}

// One stage of warpgroup c's tile: wait for it, zero the lines valid .. N16*16-1 if any (a group's last stage: rows
// past the group's end in the last 16-row step multiplied), its first N16 16-row steps of WGMMA, then commit and hand
// back the previous stage (stage_issued).
template <int CLUSTER, int N16>
__device__ __forceinline__ void reduce_stage(float (&acc)[2][64], uint8_t* xs0, uint8_t* ys0, uint64_t* full,
                                             uint64_t* empty, StageRing<kStagesW>& ring, int& prev, int valid, int c,
                                             int ctid, int lane) {
  const int s = ring.s;
  bar_wait(&full[s], ring.phase);
  uint8_t* xs = xs0 + s * kXBytes;
  uint8_t* ys = ys0 + s * kYBytes;
  if (valid < N16 * 16) {
    zero_lines(xs, kXBytes / kChunkW, valid, N16 * 16, ctid, 256);
    zero_lines(ys, kYBytes / kChunkW, valid, N16 * 16, ctid, 256);
    fence_proxy_async_smem();  // the zeros, visible to the WGMMAs of both warpgroups
    consumers_sync();
  }
  fence_regs(acc[0]);
  fence_regs(acc[1]);
  wgmma_fence();
  stage_mma<N16>(acc, xs, ys, c);
  stage_issued<CLUSTER>(acc, empty, prev, s, ring, lane);
}

// A tile's stages: all but the last whole (4 steps of 16 rows), the last NL steps (a template argument, so that
// each stage's WGMMAs are straight-line code: with the count chosen by branches around them ptxas serialized every
// WGMMA, no warning given).
template <int CLUSTER, int NL>
__device__ __forceinline__ void reduce_tile(float (&acc)[2][64], uint8_t* xs0, uint8_t* ys0, uint64_t* full,
                                            uint64_t* empty, StageRing<kStagesW>& ring, int steps, int last_valid,
                                            int c, int ctid, int lane) {
  int prev = -1;  // the stage whose products are still in flight
  for (int kb = 0; kb + 1 < steps; ++kb)
    reduce_stage<CLUSTER, kStepRows / 16>(acc, xs0, ys0, full, empty, ring, prev, kStepRows, c, ctid, lane);
  reduce_stage<CLUSTER, NL>(acc, xs0, ys0, full, empty, ring, prev, last_valid, c, ctid, lane);
  stages_done<CLUSTER>(acc, empty, prev, lane);
}

// Group g's rows start .. end, clamped like TileWalk (bad counts never read past M).
__device__ __forceinline__ int2 group_rows(const ArgsW& p, int g) {
  const int start = g ? static_cast<int>(max(int64_t(0), min(p.offs[g - 1], int64_t(p.M)))) : 0;
  return make_int2(start, static_cast<int>(max(int64_t(start), min(p.offs[g], int64_t(p.M)))));
}

// Unit t: group g, CLUSTER row tiles of out[g] (this CTA's: rows p0 .. p0+127), columns q0 .. q0+255 (row units
// fastest: consecutive units share y's columns), the group's rows start .. end (clamped like TileWalk, so bad
// counts never read past M), steps.
template <int CLUSTER>
struct WTile {
  int g, p0, q0, start, end, steps;
  // The coordinates of unit t; rows start .. end (read by the producer from offs, passed to the consumers in
  // shared memory so that they never wait on global memory between tiles).
  __device__ __forceinline__ WTile(const ArgsW& p, int t, uint32_t rank, int row_start, int row_end) {
    const int pu = ((p.P + kBM - 1) / kBM + CLUSTER - 1) / CLUSTER, qt = (p.Q + kBN - 1) / kBN;
    g = t / (pu * qt);
    const int r = t - g * pu * qt;
    p0 = ((r % pu) * CLUSTER + int(rank)) * kBM;
    q0 = (r / pu) * kBN;
    start = row_start;
    end = row_end;
    steps = (end - start + kStepRows - 1) / kStepRows;
  }
  // The rows of unit t's group.
  __device__ __forceinline__ static int2 rows(const ArgsW& p, int t) {
    return group_rows(p, t / ((((p.P + kBM - 1) / kBM + CLUSTER - 1) / CLUSTER) * ((p.Q + kBN - 1) / kBN)));
  }
  __device__ __forceinline__ static int count(const ArgsW& p) {
    return p.G * (((p.P + kBM - 1) / kBM + CLUSTER - 1) / CLUSTER) * ((p.Q + kBN - 1) / kBN);
  }
};

// CLUSTER 1: tiles handed out at run time (their costs follow the groups' rows). CLUSTER 2: the two CTAs of a
// cluster take two row tiles of one group with the same columns and share y's boxes by TMA multicast (each loads
// two of the four), so a CTA reads 32 KB per stage from L2 instead of 48; units in a fixed round robin (units run
// group by group and a cluster takes every (clusters)-th, so every cluster gets about the same rows).
template <int CLUSTER, bool STSM = false>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_wgrad_kernel(const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_y,
                         const __grid_constant__ CUtensorMap map_out, const ArgsW p) {
  static_assert(CLUSTER == 1 || CLUSTER == 2, "one CTA, or two sharing y");
  extern __shared__ uint8_t smem_raw[];
  const SmemW smem(smem_raw);  // x [stages][2 boxes][64 rows][128 bytes], y [stages][4 boxes][64 rows][128 bytes]
  uint64_t* full = smem.full;
  uint64_t* empty = smem.empty;
  uint8_t* out_smem = smem.a + kStagesW * (kXBytes + kYBytes) + kSmemAlign;  // past the barriers, 1 KB aligned
  int4* info = reinterpret_cast<int4*>(out_smem + kOutBytes);  // [stages] (unit, rows start, rows end) or -1
  const int wg = threadIdx.x / 128;
  const uint32_t rank = CLUSTER > 1 ? cluster_rank() : 0;
  const int total = WTile<CLUSTER>::count(p);
  const int first = blockIdx.x / CLUSTER, stride = gridDim.x / CLUSTER;
  init_stage_barriers<kStagesW, CLUSTER>(full, empty);

  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x != 0) return;
    StageRing<kStagesW> ring;
    int t = first;
    int2 rows = t < total ? WTile<CLUSTER>::rows(p, t) : make_int2(0, 0);
    for (;;) {
      if (t >= total) {  // no more: the consumers read -1 in the next stage's info (and release it)
        bar_wait(&empty[ring.s], ring.phase ^ 1);
        info[ring.s] = make_int4(-1, 0, 0, 0);
        bar_arrive(&full[ring.s]);
        ring.advance();
        break;
      }
      // the next unit claimed now: the atomic's round trip runs while this unit's stages are issued
      const int t_next = CLUSTER == 1 ? stride + atomicAdd(p.counter, 1) : t + stride;
      const WTile<CLUSTER> w(p, t, rank, rows.x, rows.y);
      const int n = w.steps > 0 ? w.steps : 1;  // a group without rows passes its unit in one empty stage
      for (int kb = 0; kb < n; ++kb) {
        const int s = ring.s;
        bar_wait(&empty[s], ring.phase ^ 1);
        if (kb == 0) info[s] = make_int4(t, w.start, w.end, 0);  // published by the arrival below (release)
        if (w.steps == 0) {
          bar_arrive(&full[s]);
        } else {
          bar_expect_tx(&full[s], kXBytes + kYBytes);
          const int row = w.start + kb * kStepRows;
          uint8_t* xs = smem.a + s * kXBytes;
          uint8_t* ys = smem.b + s * kYBytes;
#pragma unroll
          for (int c = 0; c < kBM / 64; ++c) {  // boxes wholly past P / Q load others: never stored
            const int pc = w.p0 + c * 64 < p.P ? w.p0 + c * 64 : 0;
            tma_load_2d(xs + c * kChunkW, &map_x, &full[s], pc, row);
          }
#pragma unroll
          for (int c = int(rank) * (4 / CLUSTER); c < int(rank + 1) * (4 / CLUSTER); ++c) {
            const int qc = w.q0 + c * 64 < p.Q ? w.q0 + c * 64 : w.q0;
            if constexpr (CLUSTER > 1)
              tma_load_2d_multicast(ys + c * kChunkW, &map_y, &full[s], qc, row, uint16_t(3));
            else
              tma_load_2d(ys + c * kChunkW, &map_y, &full[s], qc, row);
          }
        }
        ring.advance();
      }
      t = t_next;
      if (t < total) rows = WTile<CLUSTER>::rows(p, t);
    }
    drain_stages<kStagesW, CLUSTER>(empty, ring);
    return;
  }

  // consumers: warpgroup c computes rows c*64 .. c*64+63 of each tile (x's box c), all 256 columns
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int c = wg - 1;
  const int ctid = threadIdx.x - 128;
  const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
  StageRing<kStagesW> ring;
  for (;;) {
    bar_wait(&full[ring.s], ring.phase);  // the unit's first stage
    const int4 in = info[ring.s];
    if (in.x < 0) {  // done: hand the stage back (a cluster's producers drain every stage before they exit)
      release_stage<CLUSTER>(empty, ring.s, lane);
      break;
    }
    const WTile<CLUSTER> w(p, in.x, rank, in.y, in.z);
    float acc[2][64];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[r][i] = 0.f;
    if (w.steps == 0) {  // no rows: a zero gradient
      release_stage<CLUSTER>(empty, ring.s, lane);
      ring.advance();
    } else {
      // the group's last stage: only its 16-row steps holding rows of the group are multiplied (at 128-256 rows
      // per group about a tenth of the WGMMAs were on rows past the end), the lines past the end inside the last
      // of them zeroed (at most 15)
      const int last_valid = w.end - w.start - (w.steps - 1) * kStepRows;  // 1 .. 64
      switch ((last_valid + 15) / 16) {
        case 1:
          reduce_tile<CLUSTER, 1>(acc, smem.a, smem.b, full, empty, ring, w.steps, last_valid, c, ctid, lane);
          break;
        case 2:
          reduce_tile<CLUSTER, 2>(acc, smem.a, smem.b, full, empty, ring, w.steps, last_valid, c, ctid, lane);
          break;
        case 3:
          reduce_tile<CLUSTER, 3>(acc, smem.a, smem.b, full, empty, ring, w.steps, last_valid, c, ctid, lane);
          break;
        default:
          reduce_tile<CLUSTER, 4>(acc, smem.a, smem.b, full, empty, ring, w.steps, last_valid, c, ctid, lane);
      }
    }
    if (ctid == 0) bulk_wait_all<true>();  // the previous tile's TMA store has read out_smem
    consumers_sync();
    if constexpr (STSM)
      stage_out_stsm(acc, out_smem, c, warp, lane);
    else
      stage_out(acc, out_smem, c, warp, lane);
    fence_proxy_async_smem();  // the tile, visible to TMA
    consumers_sync();
    if (ctid == 0 && w.p0 < p.P) {  // (rank 1 of a group's odd last row tile has no rows of out)
#pragma unroll
      for (int b = 0; b < kBN / 64; ++b) tma_store_3d(&map_out, out_smem + b * (kBM * 128), w.q0 + b * 64, w.p0, w.g);
      bulk_commit();
    }
  }
  if (ctid == 0) bulk_wait_all<false>();  // out_smem must outlive the stores' reads; the writes done too
}

// out [G, P, Q] bf16 (row stride ldo, group stride out_group elements) = per group g (rows offs[g-1] .. offs[g])
// x[rows]^T @ y[rows]; x [M, P], y [M, Q] bf16, row strides ldx, ldy elements; offs: int64 cumulative group ends
// [G] on the GPU; counter: a zeroed int32 on the GPU (the dynamic tile order); stsm: the epilogue by stmatrix.
void grouped_wgrad(int device, uint64_t stream, uint64_t x_addr, uint64_t y_addr, uint64_t out_addr,
                   uint64_t offs_addr, int64_t M, int64_t P, int64_t Q, int64_t G, int64_t ldx, int64_t ldy,
                   int64_t ldo, int64_t out_group, int num_sms, uint64_t counter, int cluster, bool stsm) {
  if (cluster != 1 && cluster != 2) throw std::invalid_argument("turbo_dist._fp8_wgmma: cluster must be 1 or 2");
  if (cluster == 1 && (!counter || counter % 4))
    throw std::invalid_argument("turbo_dist._fp8_wgmma: grouped_wgrad with cluster 1 needs a zeroed, 4-byte aligned "
                                "int32 counter");
  if (P <= 0 || Q <= 0 || G <= 0) return;
  if (M <= 0)
    throw std::invalid_argument("turbo_dist._fp8_wgmma: grouped_wgrad needs M >= 1 (no rows: the gradient is zero, "
                                "no launch needed)");
  if (P % 8 || ldx % 8 || ldy % 8 || out_group % 8 || x_addr % 16 || y_addr % 16)
    throw std::invalid_argument("turbo_dist._fp8_wgmma: grouped_wgrad needs P, the row strides and the output's "
                                "group stride multiples of 8 elements and the operands 16-byte aligned");
  check_launch(M, Q, P, G, ldo, out_addr, num_sms, cluster);
  const int64_t tiles = G * (((P + kBM - 1) / kBM + cluster - 1) / cluster) * ((Q + kBN - 1) / kBN);  // units
  if (tiles >= INT32_MAX) throw std::invalid_argument("turbo_dist._fp8_wgmma: grouped_wgrad: too many tiles");
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  constexpr CUtensorMapDataType kBf16 = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const uint32_t box[2] = {64, kStepRows};
  const uint64_t dims_x[2] = {uint64_t(P), uint64_t(M)}, strides_x[1] = {uint64_t(ldx) * 2};
  const uint64_t dims_y[2] = {uint64_t(Q), uint64_t(M)}, strides_y[1] = {uint64_t(ldy) * 2};
  const CUtensorMap map_x = make_map(x_addr, 2, dims_x, strides_x, box, kBf16);
  const CUtensorMap map_y = make_map(y_addr, 2, dims_y, strides_y, box, kBf16);
  const uint64_t dims_o[3] = {uint64_t(Q), uint64_t(P), uint64_t(G)};
  const uint64_t strides_o[2] = {uint64_t(ldo) * 2, uint64_t(out_group) * 2};
  const uint32_t box_o[3] = {64, kBM, 1};
  const CUtensorMap map_out = make_map(out_addr, 3, dims_o, strides_o, box_o, kBf16);
  ArgsW args;
  args.offs = reinterpret_cast<const int64_t*>(offs_addr);
  args.out = reinterpret_cast<__nv_bfloat16*>(out_addr);
  args.counter = reinterpret_cast<int*>(counter);
  args.out_group = out_group;
  args.ldo = ldo;
  args.M = int(M);
  args.P = int(P);
  args.Q = int(Q);
  args.G = int(G);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  if (stsm && cluster == 2)
    launch_persistent<grouped_wgrad_kernel<2, true>, 2, kSmemBytesW>(device, tiles, num_sms, st, map_x, map_y,
                                                                     map_out, args);
  else if (stsm)
    launch_persistent<grouped_wgrad_kernel<1, true>, 1, kSmemBytesW>(device, tiles, num_sms, st, map_x, map_y,
                                                                     map_out, args);
  else if (cluster == 2)
    launch_persistent<grouped_wgrad_kernel<2>, 2, kSmemBytesW>(device, tiles, num_sms, st, map_x, map_y, map_out,
                                                               args);
  else
    launch_persistent<grouped_wgrad_kernel<1>, 1, kSmemBytesW>(device, tiles, num_sms, st, map_x, map_y, map_out,
                                                               args);
}

}  // namespace

namespace turbo_dist_wgmma {

void register_wgrad(py::module_& m) {
  m.def("grouped_wgrad", &grouped_wgrad, py::arg("device"), py::arg("stream"), py::arg("x"), py::arg("y"),
        py::arg("out"), py::arg("offs"), py::arg("M"), py::arg("P"), py::arg("Q"), py::arg("G"), py::arg("ldx"),
        py::arg("ldy"), py::arg("ldo"), py::arg("out_group"), py::arg("num_sms"), py::arg("counter") = 0,
        py::arg("cluster") = 1, py::arg("stsm") = false);
}

}  // namespace turbo_dist_wgmma
