// bf16 grouped GEMM (MoE experts) for Hopper (sm_90a) in one persistent launch that reads the group boundaries
// on the GPU: the FP8 kernel's structure (grouped_blockwise.cu) without the scales, for backend "wgmma" of
// ops.grouped_gemm (opt-in until measured, turbo_dist/ops/grouped_wgmma.py).
//
// out[rows of g] = a[rows of g] @ B_g, B_g [K, N] read from b: "K-major" b [G, N, K] with K contiguous (the
// dgrad's operand, grouped_gemm(..., trans_b=True)) or "N-major" b [G, K, N] with N contiguous (the forward's,
// trans_b=False), both by TMA in 128-byte swizzled rows. Per CTA a producer warp streams 128 x 64 A and 256 x 64
// B stages (48 KB, four stages); two consumer warpgroups (64 rows each) run WGMMA m64n256k16 and keep one stage's
// products in flight while the next is issued (no promotion: one accumulator of 128 registers per thread). With
// cluster 2 the two CTAs take two row tiles of a group and share each weight tile by TMA multicast. With a tile
// counter (DYN) tiles are handed out at run time and a group's last <= 64 rows run as a half tile: 64 rows, each
// consumer warpgroup m64n128 on half the columns, half the WGMMA work of a 128-row tile (at ~256 rows per expert
// with skewed counts, a fifth of the tiles' rows are past their group's end). On request (tall) 256 x 128 tiles
// instead, cuBLAS's shape for these GEMMs (grouped_bf16_tall_kernel below). Tiles, tile order and the epilogue:
// common.h.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

namespace {

constexpr int kBK16 = 64;                           // K per stage: 64 bf16 = one 128-byte swizzle row
constexpr int kStages16 = 4;
constexpr int kABytes16 = kBM * kBK16 * 2;          // 16 KB
constexpr int kBBytes16 = kBN * kBK16 * 2;          // 32 KB
constexpr int kChunkBytes16 = 64 * kBK16 * 2;       // N-major B: one box of 64 columns x 64 K rows, 8 KB
using Smem16 = StageSmem<kStages16, kABytes16, kBBytes16>;
constexpr int kSmemBytes16 = Smem16::kBytes;

struct Args16 {
  const int64_t* offs;  // cumulative group ends [G]
  __nv_bfloat16* out;   // out[row * ldo + col]
  int* counter;         // DYN: tiles handed out past the first wave, zeroed before the launch
  int64_t ldo;
  int M, N, K, G;
  Fixup fix;            // the stream-K tail (common.h), tail_pct 0: none
};

// A consumer warpgroup's K steps kb0 .. kb1 of one tile: full (HALF false: rows c*64 .. c*64+63 of the tile, all 256
// columns, m64n256) or half (a group's last <= 64 rows: rows 0 .. 63, columns c*128 .. c*128+127, m64n128 into
// acc[0], half the WGMMA work). One stage's products stay in flight while the next is issued.
template <bool N_MAJOR, int CLUSTER, bool HALF>
__device__ __forceinline__ void consume16(float (&acc)[2][64], const uint8_t* smem_a, const uint8_t* smem_b,
                                          uint64_t* full, uint64_t* empty, StageRing<kStages16>& ring, int c,
                                          int kb0, int kb1, int lane) {
  int prev = -1;  // the stage whose products are still in flight
  for (int kb = kb0; kb < kb1; ++kb) {
    const int s = ring.s;
    bar_wait(&full[s], ring.phase);
    fence_regs(acc[0]);
    fence_regs(acc[1]);
    wgmma_fence();
    const uint8_t* a_stage = smem_a + s * kABytes16 + (HALF ? 0 : c * 64 * 128);
    const uint8_t* b_stage = smem_b + s * kBBytes16;
#pragma unroll
    for (int kk = 0; kk < kBK16 / 16; ++kk) {  // 16 K per WGMMA: 32 bytes along A's rows
      const uint64_t desc_a = smem_desc(a_stage) + 2 * kk;
      if constexpr (HALF) {  // columns c*128 ..: chunks 2c, 2c+1 (N-major) or B rows c*128 .. (K-major)
        if constexpr (N_MAJOR)
          mma_64x128x16_bf16<true>(
              acc[0], desc_a, smem_desc_mn(b_stage + c * 2 * kChunkBytes16 + kk * 16 * 128, kChunkBytes16, 1024), 1);
        else
          mma_64x128x16_bf16<false>(acc[0], desc_a, smem_desc(b_stage + c * 128 * 128) + 2 * kk, 1);
      } else if constexpr (N_MAJOR) {  // 16 K rows of 128 bytes further; chunks 8 KB apart, 8-row groups 1 KB apart
        mma_64x256x16_bf16<true>(acc, desc_a, smem_desc_mn(b_stage + kk * 16 * 128, kChunkBytes16, 1024), 1);
      } else {
        mma_64x256x16_bf16<false>(acc, desc_a, smem_desc(b_stage) + 2 * kk, 1);
      }
    }
    wgmma_commit();
    wgmma_wait<1>();  // the previous stage's products are done: hand it back
    fence_regs(acc[0]);
    fence_regs(acc[1]);
    if (prev >= 0) release_stage<CLUSTER>(empty, prev, lane);
    prev = s;
    ring.advance();
  }
  wgmma_wait<0>();
  fence_regs(acc[0]);
  fence_regs(acc[1]);
  if (prev >= 0) release_stage<CLUSTER>(empty, prev, lane);
}

// DYN: tiles handed out at run time (the first wave by block index, then one atomicAdd on p.counter per tile by the
// producer, its tile index passed to the consumers in the slot of the tile's first stage), and a group's last <= 64
// rows as a half tile (the 64-row box map_a64, each consumer warpgroup half the columns): tiles of two costs, which
// a fixed round robin would leave unbalanced. One CTA per tile, no stream-K tail.
template <bool N_MAJOR, int CLUSTER, bool TAIL, bool DYN>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_bf16_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_a64,
                        const __grid_constant__ CUtensorMap map_b, const Args16 p) {
  static_assert(CLUSTER == 1 || CLUSTER == 2, "one CTA, or two sharing the weight tile");
  static_assert(!TAIL || CLUSTER == 1, "the stream-K tail: one CTA per tile");
  static_assert(!DYN || (CLUSTER == 1 && !TAIL), "dynamic tiles: one CTA per tile, no stream-K tail");
  extern __shared__ uint8_t smem_raw[];
  const Smem16 smem(smem_raw);  // A [stages][128 rows][128 bytes]; B K-major [stages][256 rows][128 bytes],
  uint8_t* smem_a = smem.a;     // N-major [stages][4 chunks][64 K rows][128 bytes]
  uint8_t* smem_b = smem.b;
  uint64_t* full = smem.full;
  uint64_t* empty = smem.empty;

  const int wg = threadIdx.x / 128;

  const uint32_t rank = CLUSTER > 1 ? cluster_rank() : 0;
  const int first_unit = blockIdx.x / CLUSTER, unit_stride = gridDim.x / CLUSTER;
  const int col_tiles = (p.N + kBN - 1) / kBN;
  const int k_steps = (p.K + kBK16 - 1) / kBK16;
  TileWalk<CLUSTER> walk;
  if constexpr (TAIL) {
    if (threadIdx.x == 0) *smem.tiles = walk.count(p, col_tiles);
  }
  init_stage_barriers<kStages16, CLUSTER>(full, empty);
  int t, kb0, kb1;  // piece i of this CTA's work (work_piece): tile t, K steps kb0 .. kb1


  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x != 0) return;
    StageRing<kStages16> ring;
    constexpr uint16_t kMask = uint16_t((1u << CLUSTER) - 1);
    // DYN: the first wave by block index, then the next tile nobody has taken (common.h, dynamic tiles)
    for (int i = 0; DYN ? producer_next_tile(i, p.counter, p, walk, col_tiles, k_steps, smem.slot, full, empty,
                                             ring, t, kb0, kb1)
                        : TD_NEXT_PIECE(i);
         ++i) {
      int m0, n0;
      walk.coords(col_tiles, t, m0, n0);
      m0 += int(rank) * kBM;
      const bool rows = m0 < walk.group_end;
      const bool half = DYN && walk.group_end - m0 <= 64;
      for (int kb = kb0; kb < kb1; ++kb) {
        const int s = ring.s;
        bar_wait(&empty[s], ring.phase ^ 1);
        if (DYN && kb == kb0) smem.slot[s] = t;  // published by the arrival below (release, CTA scope)
        bar_expect_tx(&full[s], (rows ? (half ? kABytes16 / 2 : kABytes16) : 0) + kBBytes16);
        if (half) tma_load_2d(smem_a + s * kABytes16, &map_a64, &full[s], kb * kBK16, m0);
        else if (rows) tma_load_2d(smem_a + s * kABytes16, &map_a, &full[s], kb * kBK16, m0);
        uint8_t* b_stage = smem_b + s * kBBytes16;
        if constexpr (N_MAJOR) {  // this CTA's share of the four 64-column chunks
#pragma unroll
          for (int c = int(rank) * (4 / CLUSTER); c < int(rank + 1) * (4 / CLUSTER); ++c) {
            const int nc = n0 + c * 64 < p.N ? n0 + c * 64 : n0;  // chunks wholly past N: columns never stored
            if constexpr (CLUSTER > 1)
              tma_load_3d_multicast(b_stage + c * kChunkBytes16, &map_b, &full[s], nc, kb * kBK16, walk.g, kMask);
            else
              tma_load_3d(b_stage + c * kChunkBytes16, &map_b, &full[s], nc, kb * kBK16, walk.g);
          }
        } else {
          constexpr int kHalf = kBN / CLUSTER;
          const int nb = n0 + int(rank) * kHalf < p.N ? n0 + int(rank) * kHalf : n0;
          if constexpr (CLUSTER > 1)
            tma_load_3d_multicast(b_stage + int(rank) * kHalf * 128, &map_b, &full[s], kb * kBK16, nb, walk.g,
                                  kMask);
          else
            tma_load_3d(b_stage, &map_b, &full[s], kb * kBK16, n0, walk.g);
        }
        ring.advance();
      }
    }
    drain_stages<kStages16, CLUSTER>(empty, ring);
    return;
  }

  // consumers: warpgroup c computes rows c*64 .. c*64+63 of each tile, all 256 columns (a half tile: all its rows,
  // columns c*128 .. c*128+127)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int c = wg - 1;
  const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
  StageRing<kStages16> ring;
  for (int i = 0; DYN ? consumer_next_tile(p, walk, col_tiles, k_steps, smem.slot, full, ring, t, kb0, kb1)
                      : TD_NEXT_PIECE(i);
       ++i) {
    int m0, n0;
    walk.coords(col_tiles, t, m0, n0);
    m0 += int(rank) * kBM;
    if (CLUSTER > 1 && m0 >= walk.group_end) {  // no rows here
      skip_stages<kStages16, CLUSTER>(full, empty, ring, kb1 - kb0, lane);
      continue;
    }
    float acc[2][64];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[r][i] = 0.f;
    if (DYN && walk.group_end - m0 <= 64) {
      consume16<N_MAJOR, CLUSTER, true>(acc, smem_a, smem_b, full, empty, ring, c, kb0, kb1, lane);
      const int r0 = m0 + warp * 16 + lane / 4;
      store_tile<1>(acc, p.out, p.ldo, p.N, n0 + c * 128, r0, r0 + 8, walk.group_end, lane);
      continue;
    }
    consume16<N_MAJOR, CLUSTER, false>(acc, smem_a, smem_b, full, empty, ring, c, kb0, kb1, lane);
    if constexpr (TAIL) {
      if (kb0 > 0) {  // a stream-K tail piece: the partial sums go to the CTA holding the tile's head
        p.fix.publish(acc, first_unit, threadIdx.x - 128);
        continue;
      }
      if (kb1 < k_steps)  // a head piece: add the others'
        p.fix.merge(acc, first_unit + 1, TailSplit(*smem.tiles, unit_stride, k_steps, p.fix).last_owner(t, k_steps),
                    threadIdx.x - 128);
    }
    const int r0 = m0 + c * 64 + warp * 16 + lane / 4;
    store_tile(acc, p.out, p.ldo, p.N, n0, r0, r0 + 8, walk.group_end, lane);
  }
}

// ---------------------------------------------------------------------------------------------- tall tiles
// 256 x 128 tiles (cuBLAS's shape for these GEMMs): per stage a 256 x 64 A box and a 128-column B box (48 KB, as
// the 128 x 256 tiles), consumer warpgroup c computes rows c*128 .. c*128+127 as two m64n128 WGMMAs per K step
// (acc[0]: its first 64 rows, acc[1]: the next 64). At <= 256 rows per expert a group's rows fit one tile, so each
// weight tile is read once per group instead of once per 128 rows. Dynamic tiles (the counter, as DYN above);
// a group's last <= 128 rows run as a half tile: a 128-row box, each warpgroup one m64n128 on its 64 rows.
constexpr int kTallBM = 256, kTallBN = 128;
constexpr int kTallABytes = kTallBM * kBK16 * 2;   // 32 KB
constexpr int kTallBBytes = kTallBN * kBK16 * 2;   // 16 KB
using SmemTall = StageSmem<kStages16, kTallABytes, kTallBBytes>;
static_assert(SmemTall::kBytes == kSmemBytes16, "tall tiles use the shared memory of the 128 x 256 ones");

template <bool N_MAJOR, bool HALF>
__device__ __forceinline__ void consume_tall(float (&acc)[2][64], const uint8_t* smem_a, const uint8_t* smem_b,
                                             uint64_t* full, uint64_t* empty, StageRing<kStages16>& ring, int c,
                                             int k_steps, int lane) {
  int prev = -1;  // the stage whose products are still in flight
  for (int kb = 0; kb < k_steps; ++kb) {
    const int s = ring.s;
    bar_wait(&full[s], ring.phase);
    fence_regs(acc[0]);
    fence_regs(acc[1]);
    wgmma_fence();
    // full: rows c*128 .. (acc[0]) and c*128+64 .. (acc[1]); half: rows c*64 .. (acc[0])
    const uint8_t* a_stage = smem_a + s * kTallABytes + (HALF ? c * 64 * 128 : c * 128 * 128);
    const uint8_t* b_stage = smem_b + s * kTallBBytes;
#pragma unroll
    for (int kk = 0; kk < kBK16 / 16; ++kk) {  // 16 K per WGMMA: 32 bytes along A's rows
      const uint64_t desc_b = N_MAJOR ? smem_desc_mn(b_stage + kk * 16 * 128, kChunkBytes16, 1024)
                                      : smem_desc(b_stage) + 2 * kk;
      mma_64x128x16_bf16<N_MAJOR>(acc[0], smem_desc(a_stage) + 2 * kk, desc_b, 1);
      if constexpr (!HALF) mma_64x128x16_bf16<N_MAJOR>(acc[1], smem_desc(a_stage + 64 * 128) + 2 * kk, desc_b, 1);
    }
    stage_issued<1>(acc, empty, prev, s, ring, lane);
  }
  stages_done<1>(acc, empty, prev, lane);
}

template <bool N_MAJOR>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_bf16_tall_kernel(const __grid_constant__ CUtensorMap map_a256, const __grid_constant__ CUtensorMap map_a,
                             const __grid_constant__ CUtensorMap map_b, const Args16 p) {
  extern __shared__ uint8_t smem_raw[];
  const SmemTall smem(smem_raw);  // A [stages][256 rows][128 bytes]; B K-major [stages][128 rows][128 bytes],
  uint8_t* smem_a = smem.a;       // N-major [stages][2 chunks][64 K rows][128 bytes]
  uint8_t* smem_b = smem.b;
  uint64_t* full = smem.full;
  uint64_t* empty = smem.empty;
  const int wg = threadIdx.x / 128;
  const int col_tiles = (p.N + kTallBN - 1) / kTallBN;
  const int k_steps = (p.K + kBK16 - 1) / kBK16;
  TileWalk<1, kTallBM, kTallBN> walk;
  init_stage_barriers<kStages16, 1>(full, empty);
  int t, kb0, kb1;

  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x != 0) return;
    StageRing<kStages16> ring;
    for (int i = 0; producer_next_tile(i, p.counter, p, walk, col_tiles, k_steps, smem.slot, full, empty, ring, t,
                                       kb0, kb1);
         ++i) {
      int m0, n0;
      walk.coords(col_tiles, t, m0, n0);
      const bool half = walk.group_end - m0 <= kTallBM / 2;
      for (int kb = 0; kb < k_steps; ++kb) {
        const int s = ring.s;
        bar_wait(&empty[s], ring.phase ^ 1);
        if (kb == 0) smem.slot[s] = t;  // published by the arrival below (release, CTA scope)
        bar_expect_tx(&full[s], (half ? kTallABytes / 2 : kTallABytes) + kTallBBytes);
        tma_load_2d(smem_a + s * kTallABytes, half ? &map_a : &map_a256, &full[s], kb * kBK16, m0);
        uint8_t* b_stage = smem_b + s * kTallBBytes;
        if constexpr (N_MAJOR) {  // two 64-column chunks
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int nc = n0 + c * 64 < p.N ? n0 + c * 64 : n0;  // a chunk wholly past N: columns never stored
            tma_load_3d(b_stage + c * kChunkBytes16, &map_b, &full[s], nc, kb * kBK16, walk.g);
          }
        } else {
          tma_load_3d(b_stage, &map_b, &full[s], kb * kBK16, n0, walk.g);
        }
        ring.advance();
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int c = wg - 1;
  const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
  StageRing<kStages16> ring;
  while (consumer_next_tile(p, walk, col_tiles, k_steps, smem.slot, full, ring, t, kb0, kb1)) {
    int m0, n0;
    walk.coords(col_tiles, t, m0, n0);
    float acc[2][64];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[r][i] = 0.f;
    if (walk.group_end - m0 <= kTallBM / 2) {
      consume_tall<N_MAJOR, true>(acc, smem_a, smem_b, full, empty, ring, c, k_steps, lane);
      const int r0 = m0 + c * 64 + warp * 16 + lane / 4;
      store_tile<1>(acc, p.out, p.ldo, p.N, n0, r0, r0 + 8, walk.group_end, lane);
      continue;
    }
    consume_tall<N_MAJOR, false>(acc, smem_a, smem_b, full, empty, ring, c, k_steps, lane);
    const int r0 = m0 + c * 128 + warp * 16 + lane / 4;
    store_tile<1>(acc, p.out, p.ldo, p.N, n0, r0, r0 + 8, walk.group_end, lane);
    store_tile<1, 1>(acc, p.out, p.ldo, p.N, n0, r0 + 64, r0 + 72, walk.group_end, lane);
  }
}

template <bool N_MAJOR, int CLUSTER, bool TAIL = false, bool DYN = false>
void launch16(int device, const CUtensorMap& map_a, const CUtensorMap& map_a64, const CUtensorMap& map_b,
              const Args16& args, int64_t units, int num_sms, cudaStream_t stream) {
  launch_persistent<grouped_bf16_kernel<N_MAJOR, CLUSTER, TAIL, DYN>, CLUSTER, kSmemBytes16>(
      device, units, num_sms, stream, map_a, map_a64, map_b, args);
}

// out [M, N] bf16 = per group g (rows offs[g-1] .. offs[g]): a[rows] @ B_g. a [M, K] bf16 at a_addr, row stride
// lda elements; b: n_major ? [G, K, N] (row stride ldb, N contiguous) : [G, N, K] (row stride ldb, K contiguous),
// group stride b_group elements; offs: int64 cumulative group ends [G] on the GPU. counter: a zeroed int32 on the
// GPU for dynamic tiles with half tiles (0: the fixed round robin of whole tiles).
void grouped_bf16(int device, uint64_t stream, uint64_t a_addr, uint64_t b_addr, uint64_t out_addr,
                  uint64_t offs_addr, int64_t M, int64_t N, int64_t K, int64_t G, int64_t lda, int64_t ldb,
                  int64_t b_group, int64_t ldo, bool n_major, int num_sms, int cluster, uint64_t ws, uint64_t flags,
                  int ws_ctas, int tail_pct, int tail_waves, double timeout_s, uint64_t counter, bool tall) {
  if (cluster != 1 && cluster != 2) throw std::invalid_argument("turbo_dist._fp8_wgmma: cluster must be 1 or 2");
  if (tall && (!counter || cluster != 1 || tail_pct > 0))
    throw std::invalid_argument("turbo_dist._fp8_wgmma: tall tiles need dynamic tiles (counter), cluster 1 and no "
                                "stream-K tail");
  const int64_t units = tall ? unit_count(M, N, G, 1, kTallBM, kTallBN) : unit_count(M, N, G, cluster);
  const Fixup fix = make_fixup(ws, flags, ws_ctas, tail_pct, tail_waves, timeout_s, num_sms, cluster,
                               units * ((K + kBK16 - 1) / kBK16));
  const bool tail = fix.tail_pct > 0;
  if (counter && (cluster != 1 || tail_pct > 0 || counter % 4))
    throw std::invalid_argument("turbo_dist._fp8_wgmma: dynamic tiles (counter) need cluster 1, no stream-K tail "
                                "and a 4-byte aligned counter");
  if (M <= 0 || N <= 0 || G <= 0) return;
  if (K <= 0 || K % 8 || lda % 8 || ldb % 8 || b_group % 8 || a_addr % 16 || b_addr % 16)
    throw std::invalid_argument("turbo_dist._fp8_wgmma: K, the row/group strides (elements) must be multiples of "
                                "8 and the operands 16-byte aligned");
  check_launch(M, N, K, G, ldo, out_addr, num_sms, cluster);
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  constexpr CUtensorMapDataType kBf16 = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const uint64_t dims_a[2] = {uint64_t(K), uint64_t(M)}, strides_a[1] = {uint64_t(lda) * 2};
  const uint32_t box_a[2] = {kBK16, kBM}, box_a64[2] = {kBK16, kBM / 2};
  const CUtensorMap map_a = make_map(a_addr, 2, dims_a, strides_a, box_a, kBf16);
  const CUtensorMap map_a64 = make_map(a_addr, 2, dims_a, strides_a, box_a64, kBf16);
  const uint64_t strides_b[2] = {uint64_t(ldb) * 2, uint64_t(b_group) * 2};
  CUtensorMap map_b;
  if (n_major) {  // boxes of 64 columns x 64 K rows
    const uint64_t dims_b[3] = {uint64_t(N), uint64_t(K), uint64_t(G)};
    const uint32_t box_b[3] = {64, kBK16, 1};
    map_b = make_map(b_addr, 3, dims_b, strides_b, box_b, kBf16);
  } else {  // boxes of (256 / cluster) rows x 64 K; tall tiles: 128 rows
    const uint64_t dims_b[3] = {uint64_t(K), uint64_t(N), uint64_t(G)};
    const uint32_t box_b[3] = {kBK16, uint32_t(tall ? kTallBN : kBN / cluster), 1};
    map_b = make_map(b_addr, 3, dims_b, strides_b, box_b, kBf16);
  }
  const Args16 args{reinterpret_cast<const int64_t*>(offs_addr), reinterpret_cast<__nv_bfloat16*>(out_addr),
                    reinterpret_cast<int*>(counter), ldo, int(M), int(N), int(K), int(G), fix};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (tall) {  // A in 256-row boxes, a group's last <= 128 rows in the 128-row ones (map_a)
    const uint32_t box_a256[2] = {kBK16, kTallBM};
    const CUtensorMap map_a256 = make_map(a_addr, 2, dims_a, strides_a, box_a256, kBf16);
    if (n_major)
      launch_persistent<grouped_bf16_tall_kernel<true>, 1, kSmemBytes16>(device, units, num_sms, s, map_a256, map_a,
                                                                          map_b, args);
    else
      launch_persistent<grouped_bf16_tall_kernel<false>, 1, kSmemBytes16>(device, units, num_sms, s, map_a256,
                                                                           map_a, map_b, args);
    return;
  }
  const CUtensorMap& a64 = map_a64;
  if (counter && n_major) launch16<true, 1, false, true>(device, map_a, a64, map_b, args, units, num_sms, s);
  else if (counter) launch16<false, 1, false, true>(device, map_a, a64, map_b, args, units, num_sms, s);
  else if (n_major && tail) launch16<true, 1, true>(device, map_a, a64, map_b, args, units, num_sms, s);
  else if (tail) launch16<false, 1, true>(device, map_a, a64, map_b, args, units, num_sms, s);
  else if (n_major && cluster == 1) launch16<true, 1>(device, map_a, a64, map_b, args, units, num_sms, s);
  else if (n_major) launch16<true, 2>(device, map_a, a64, map_b, args, units, num_sms, s);
  else if (cluster == 1) launch16<false, 1>(device, map_a, a64, map_b, args, units, num_sms, s);
  else launch16<false, 2>(device, map_a, a64, map_b, args, units, num_sms, s);
}

}  // namespace

namespace turbo_dist_wgmma {

void register_bf16(py::module_& m) {
  m.def("grouped_bf16", &grouped_bf16, py::arg("device"), py::arg("stream"), py::arg("a"), py::arg("b"),
        py::arg("out"), py::arg("offs"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("G"), py::arg("lda"),
        py::arg("ldb"), py::arg("b_group"), py::arg("ldo"), py::arg("n_major"), py::arg("num_sms"),
        py::arg("cluster") = 1, py::arg("ws") = 0, py::arg("flags") = 0, py::arg("ws_ctas") = 0,
        py::arg("tail_pct") = 0, py::arg("tail_waves") = 2, py::arg("timeout_s") = 100.0, py::arg("counter") = 0,
        py::arg("tall") = false);
  m.attr("SMEM_BYTES_BF16") = kSmemBytes16;
}

}  // namespace turbo_dist_wgmma
