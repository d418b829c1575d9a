// turbo_dist._fp8_wgmma: FP8 BLOCKWISE grouped GEMM (MoE experts) for Hopper (sm_90a) in one persistent launch
// that reads the group boundaries on the GPU.
//
// out[rows of g] = (a * scale_a)[rows of g] @ (w[g] * scale_w[g])^T with 1x128 activation scales and 128x128
// weight scales (DeepSeek-V3's recipe). Our Triton kernel for this promotes each 128-deep partial product in
// registers and Triton 3.6 makes the tensor cores wait for it (README, "Benchmarks"); cuBLASLt does it well but
// only one GEMM per call, which needs the group sizes on the host. Here each CTA is warp-specialized: one
// producer warp streams A and B tiles with TMA into a ring of shared-memory stages, and two consumer warpgroups
// (64 rows of the 128-row tile each) run the K loop on WGMMA. A consumer promotes its partial product (scale_a
// of its rows x scale_w of the block) while the other consumer's WGMMA keeps the tensor cores busy.
//
// Tiles: 128 rows x 256 columns x 128-deep K stages (four 48 KB stages). A tile never spans two groups' weights:
// each group's rows start a new tile; rows past the group's end are computed and not stored. The tile order (a
// band of 8 row tiles x all column tiles, rows fastest) keeps a band's A and the weights it needs in L2. With
// cluster 2, two CTAs take two row tiles of a group and share each weight tile by TMA multicast (the kernel's
// comment below).
// Operands: a [M, K] row-major e4m3/e5m2; w [G, N, K] with K contiguous (each expert's weight as nn.Linear stores
// it); K, row strides and pointers 16-byte aligned (TMA); out bf16 [M, N] row-major.
//
// Measured on one H200 (benchmarks/results/probe_fp8_wgmma_*_h200.json; ncu with clocks locked): the tensor pipe
// is busy ~63% of the active cycles, one CTA per tile or two; L2 throughput ~48% of peak. Sharing the weight
// tile in 2-CTA clusters is 3-7% faster at ~1024 rows per expert (less L2 traffic, so higher clocks under the
// power limit) and 4-8% slower at ~256 (a group's odd last row tile leaves one CTA of the pair idle); the
// Python side picks it by rows per group. Left out: 128-column tiles (5-15% slower), the consumers issuing
// WGMMA in strict turns (0-10% slower), the next stage's scales loaded a stage ahead (1-8% slower), and a
// group's last <= 64 rows as a 64-row tile, with the second consumer idle (5% slower) or taking half the
// columns (2-5% slower).
//
// Built without torch headers, like turbo_dist._cublaslt: tensors travel as addresses, the caller (backend
// "wgmma" in turbo_dist/ops/fp8_wgmma.py) checks dtypes, shapes, strides and devices first.
#include <pybind11/pybind11.h>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common.h"

namespace py = pybind11;

namespace {

constexpr int kBK = 128;              // K per stage = the scale block (128 FP8 bytes)
constexpr int kStages = 4;
constexpr int kABytes = kBM * kBK;    // one byte per FP8 element
constexpr int kBBytes = kBN * kBK;
using Smem = StageSmem<kStages, kABytes, kBBytes>;
constexpr int kSmemBytes = Smem::kBytes;

struct Args {
  const int64_t* offs;  // cumulative group ends [G] (group g: rows offs[g-1] .. offs[g])
  const float* sa;      // activation scales: sa[row * sa_row + kb * sa_k]
  const float* sb;      // weight scales: sb[g * sb_g + kb * sb_k + nb * sb_n]
  __nv_bfloat16* out;   // out[row * ldo + col]
  int64_t sa_row, sa_k, sb_g, sb_k, sb_n, ldo;
  int M, N, K, G;
  Fixup fix;            // the stream-K tail (common.h), tail_pct 0: none; DYN (no tail): fix.flags is the tile
};                      // counter (a field of its own changed the default kernels' code)

// --------------------------------------------------------------------------------------------- kernel
// CLUSTER 2: the two CTAs of a cluster take two row tiles of one group with the same columns, so they need the
// same weight tile: each loads half of its rows and multicasts them to both, and reads (128 + 128) x 128 bytes
// per stage from L2 instead of (128 + 256) x 128. A stage is then free only when the consumers of both CTAs have
// released it. When a group's row tiles are odd in number, its last unit leaves rank 1 without rows: that CTA
// still loads and multicasts its half of the weights, and its consumers only release the stages.
// DYN: grouped_bf16.cu's dynamic tiles with half tiles (a group's last <= 64 rows: each consumer warpgroup all 64
// rows of one 128-column half, one round of WGMMA and promotion instead of two; the A stage still holds 128 rows,
// of which the half tile reads the first 64). Tiles handed out by an atomic counter, the index passed to the
// consumers in the slot of each tile's first stage. One CTA per tile, no stream-K tail.
template <bool AE5M2, bool BE5M2, int CLUSTER, bool TAIL, bool DYN = false>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_blockwise_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                             const Args p) {
  static_assert(CLUSTER == 1 || CLUSTER == 2, "one CTA, or two sharing the weight tile");
  static_assert(!TAIL || CLUSTER == 1, "the stream-K tail: one CTA per tile");
  static_assert(!DYN || (CLUSTER == 1 && !TAIL), "dynamic tiles: one CTA per tile, no stream-K tail");
  extern __shared__ uint8_t smem_raw[];
  const Smem smem(smem_raw);  // A [stages][128 rows][128 bytes], B [stages][256 rows][128 bytes]
  uint8_t* smem_a = smem.a;
  uint8_t* smem_b = smem.b;
  uint64_t* full = smem.full;
  uint64_t* empty = smem.empty;

  const int wg = threadIdx.x / 128;

  const uint32_t rank = CLUSTER > 1 ? cluster_rank() : 0;
  const int first_unit = blockIdx.x / CLUSTER, unit_stride = gridDim.x / CLUSTER;
  const int col_tiles = (p.N + kBN - 1) / kBN;
  const int k_steps = (p.K + kBK - 1) / kBK;
  TileWalk<CLUSTER> walk;
  if constexpr (TAIL) {
    if (threadIdx.x == 0) *smem.tiles = walk.count(p, col_tiles);
  }
  init_stage_barriers<kStages, CLUSTER>(full, empty);
  int t, kb0, kb1;  // piece i of this CTA's work (work_piece): tile t, K steps kb0 .. kb1


  if (wg == 0) {  // producer: one thread issues every TMA load
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x != 0) return;
    StageRing<kStages> ring;
    // DYN: the first wave by block index, then the next tile nobody has taken; past the last, -1 in the next
    // stage's slot for the consumers
    for (int i = 0; DYN ? producer_next_tile(i, p.fix.flags, p, walk, col_tiles, k_steps, smem.slot, full, empty,
                                             ring, t, kb0, kb1)
                        : TD_NEXT_PIECE(i);
         ++i) {
      int m0, n0;
      walk.coords(col_tiles, t, m0, n0);
      m0 += int(rank) * kBM;
      const bool rows = m0 < walk.group_end;  // rank 1 of a group's odd last unit has none
      constexpr int kHalf = kBN / CLUSTER;    // weight rows this CTA loads (for every CTA of the cluster)
      // a half wholly past N loads the first half's rows again: columns >= N are computed, never stored
      const int nb = n0 + int(rank) * kHalf < p.N ? n0 + int(rank) * kHalf : n0;
      for (int kb = kb0; kb < kb1; ++kb) {
        const int s = ring.s;
        bar_wait(&empty[s], ring.phase ^ 1);
        if (DYN && kb == kb0) smem.slot[s] = t;  // published by the arrival below (release, CTA scope)
        bar_expect_tx(&full[s], (rows ? kABytes : 0) + kBBytes);
        if (rows) tma_load_2d(smem_a + s * kABytes, &map_a, &full[s], kb * kBK, m0);
        if constexpr (CLUSTER > 1)
          tma_load_3d_multicast(smem_b + s * kBBytes + int(rank) * kHalf * kBK, &map_b, &full[s], kb * kBK, nb,
                                walk.g, uint16_t((1u << CLUSTER) - 1));
        else
          tma_load_3d(smem_b + s * kBBytes, &map_b, &full[s], kb * kBK, n0, walk.g);
        ring.advance();
      }
    }
    drain_stages<kStages, CLUSTER>(empty, ring);
    return;
  }

  // consumers: warpgroup c computes rows c*64 .. c*64+63 of each tile, all 256 columns (two rounds of 128)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int c = wg - 1;
  const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
  const int row_in_tile = c * 64 + warp * 16 + lane / 4;  // this thread's rows: row_in_tile and row_in_tile + 8,
                                                          // columns 2 (lane % 4), +1 of every 8-column chunk
  const int nb_last = (p.N - 1) / 128;
  StageRing<kStages> ring;
  for (int i = 0; DYN ? consumer_next_tile(p, walk, col_tiles, k_steps, smem.slot, full, ring, t, kb0, kb1)
                      : TD_NEXT_PIECE(i);
       ++i) {
    int m0, n0;
    walk.coords(col_tiles, t, m0, n0);
    m0 += int(rank) * kBM;
    if (CLUSTER > 1 && m0 >= walk.group_end) {  // no rows here
      skip_stages<kStages, CLUSTER>(full, empty, ring, kb1 - kb0, lane);
      continue;
    }
    if (DYN && walk.group_end - m0 <= 64) {  // a half tile: rows 0 .. 63, this warpgroup's 128 columns, in acc[0]
      const int h0 = m0 + warp * 16 + lane / 4, h1 = h0 + 8;
      const float* ha0 = p.sa + int64_t(min(h0, p.M - 1)) * p.sa_row;
      const float* ha1 = p.sa + int64_t(min(h1, p.M - 1)) * p.sa_row;
      const float* hb = p.sb + int64_t(walk.g) * p.sb_g + int64_t(min(n0 / 128 + c, nb_last)) * p.sb_n;
      float acc[2][64];
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[0][i] = 0.f;
      for (int kb = kb0; kb < kb1; ++kb) {
        const float s0 = __ldg(ha0 + kb * p.sa_k) * __ldg(hb + kb * p.sb_k);
        const float s1 = __ldg(ha1 + kb * p.sa_k) * __ldg(hb + kb * p.sb_k);
        const int s = ring.s;
        bar_wait(&full[s], ring.phase);
        const uint64_t desc_a = smem_desc(smem_a + s * kABytes);
        const uint64_t desc_b = smem_desc(smem_b + s * kBBytes + c * 128 * kBK);
        float part[64];
        fence_regs(part);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBK / 32; ++kk)
          mma_64x128x32<AE5M2, BE5M2>(part, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(part);
        release_stage<CLUSTER>(empty, s, lane);
#pragma unroll
        for (int i = 0; i < 64; i += 4) {
          acc[0][i] += part[i] * s0;
          acc[0][i + 1] += part[i + 1] * s0;
          acc[0][i + 2] += part[i + 2] * s1;
          acc[0][i + 3] += part[i + 3] * s1;
        }
        ring.advance();
      }
      store_tile<1>(acc, p.out, p.ldo, p.N, n0 + c * 128, h0, h1, walk.group_end, lane);
      continue;
    }
    const int r0 = m0 + row_in_tile, r1 = r0 + 8;
    const float* sa0 = p.sa + int64_t(min(r0, p.M - 1)) * p.sa_row;  // rows past M: read, never stored
    const float* sa1 = p.sa + int64_t(min(r1, p.M - 1)) * p.sa_row;
    const float* sb = p.sb + int64_t(walk.g) * p.sb_g;
    int64_t sb_col[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) sb_col[r] = int64_t(min(n0 / 128 + r, nb_last)) * p.sb_n;

    float acc[2][64];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[r][i] = 0.f;

    for (int kb = kb0; kb < kb1; ++kb) {  // scales loaded here, not a stage ahead (measured: 1-8% faster)
      const float a0 = __ldg(sa0 + kb * p.sa_k), a1 = __ldg(sa1 + kb * p.sa_k);
      float w[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) w[r] = __ldg(sb + kb * p.sb_k + sb_col[r]);
      const int s = ring.s;
      bar_wait(&full[s], ring.phase);
      const uint64_t desc_a = smem_desc(smem_a + s * kABytes + c * 64 * kBK);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint64_t desc_b = smem_desc(smem_b + s * kBBytes + r * 128 * kBK);
        float part[64];
        fence_regs(part);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBK / 32; ++kk)  // 32 bytes further along K: +2 in the descriptor's 16-byte units
          mma_64x128x32<AE5M2, BE5M2>(part, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(part);
        if (r == 1) release_stage<CLUSTER>(empty, s, lane);
        const float s0 = a0 * w[r], s1 = a1 * w[r];
#pragma unroll
        for (int i = 0; i < 64; i += 4) {
          acc[r][i] += part[i] * s0;
          acc[r][i + 1] += part[i + 1] * s0;
          acc[r][i + 2] += part[i + 2] * s1;
          acc[r][i + 3] += part[i + 3] * s1;
        }
      }
      ring.advance();
    }
    if constexpr (TAIL) {
      if (kb0 > 0) {  // a stream-K tail piece: the partial sums go to the CTA holding the tile's head
        p.fix.publish(acc, first_unit, threadIdx.x - 128);
        continue;
      }
      if (kb1 < k_steps)  // a head piece: add the others'
        p.fix.merge(acc, first_unit + 1, TailSplit(*smem.tiles, unit_stride, k_steps, p.fix).last_owner(t, k_steps),
                    threadIdx.x - 128);
    }
    store_tile(acc, p.out, p.ldo, p.N, n0, r0, r1, walk.group_end, lane);
  }
}

// ------------------------------------------------------------------------------------------------ host
template <int CLUSTER, bool TAIL, bool DYN = false>
void launch_types(int device, bool a_e5m2, bool b_e5m2, const CUtensorMap& ma, const CUtensorMap& mb,
                  const Args& args, int64_t units, int num_sms, cudaStream_t s) {
  if (!a_e5m2 && !b_e5m2)
    launch_persistent<grouped_blockwise_kernel<false, false, CLUSTER, TAIL, DYN>, CLUSTER, kSmemBytes>(
        device, units, num_sms, s, ma, mb, args);
  else if (a_e5m2 && !b_e5m2)
    launch_persistent<grouped_blockwise_kernel<true, false, CLUSTER, TAIL, DYN>, CLUSTER, kSmemBytes>(
        device, units, num_sms, s, ma, mb, args);
  else if (!a_e5m2 && b_e5m2)
    launch_persistent<grouped_blockwise_kernel<false, true, CLUSTER, TAIL, DYN>, CLUSTER, kSmemBytes>(
        device, units, num_sms, s, ma, mb, args);
  else
    launch_persistent<grouped_blockwise_kernel<true, true, CLUSTER, TAIL, DYN>, CLUSTER, kSmemBytes>(
        device, units, num_sms, s, ma, mb, args);
}

// out [M, N] bf16 = per group g (rows offs[g-1] .. offs[g]): (a * scale_a) @ (w[g] * scale_w[g])^T.
// a [M, K] at a_addr, row stride lda bytes; w [G, N, K] at w_addr, row stride ldw and group stride w_group bytes;
// offs: int64 cumulative group ends [G] on the GPU; scales fp32 with the element strides given. cluster 1: one
// CTA per 128 x 256 tile; 2: two CTAs per 256 x 256 unit sharing the weight tile (TMA multicast).
void grouped_blockwise(int device, uint64_t stream, uint64_t a_addr, uint64_t w_addr, uint64_t out_addr,
                       uint64_t offs_addr, uint64_t sa_addr, int64_t sa_row, int64_t sa_k, uint64_t sb_addr,
                       int64_t sb_g, int64_t sb_k, int64_t sb_n, int64_t M, int64_t N, int64_t K, int64_t G,
                       int64_t lda, int64_t ldw, int64_t w_group, int64_t ldo, bool a_e5m2, bool b_e5m2,
                       int num_sms, int cluster, uint64_t ws, uint64_t flags, int ws_ctas, int tail_pct,
                       int tail_waves, double timeout_s, uint64_t counter) {
  if (cluster != 1 && cluster != 2) throw std::invalid_argument("turbo_dist._fp8_wgmma: cluster must be 1 or 2");
  const int64_t units = unit_count(M, N, G, cluster);
  const Fixup fix = make_fixup(ws, flags, ws_ctas, tail_pct, tail_waves, timeout_s, num_sms, cluster,
                               units * ((K + kBK - 1) / kBK));
  if (counter && (cluster != 1 || tail_pct > 0 || counter % 4))
    throw std::invalid_argument("turbo_dist._fp8_wgmma: dynamic tiles (counter) need cluster 1, no stream-K tail "
                                "and a 4-byte aligned counter");
  if (M <= 0 || N <= 0 || G <= 0) return;
  if (K <= 0 || K % 16 || lda % 16 || ldw % 16 || w_group % 16 || a_addr % 16 || w_addr % 16)
    throw std::invalid_argument("turbo_dist._fp8_wgmma: K, the row/group strides and the operand addresses must be "
                                "multiples of 16 bytes");
  check_launch(M, N, K, G, ldo, out_addr, num_sms, cluster);
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  const uint64_t dims_a[2] = {uint64_t(K), uint64_t(M)}, strides_a[1] = {uint64_t(lda)};
  const uint32_t box_a[2] = {kBK, kBM};
  const uint64_t dims_b[3] = {uint64_t(K), uint64_t(N), uint64_t(G)}, strides_b[2] = {uint64_t(ldw),
                                                                                          uint64_t(w_group)};
  const uint32_t box_b[3] = {kBK, uint32_t(kBN / cluster), 1};  // clusters: each CTA loads its share of the rows
  const CUtensorMap map_a = make_map(a_addr, 2, dims_a, strides_a, box_a);
  const CUtensorMap map_b = make_map(w_addr, 3, dims_b, strides_b, box_b);
  Args args;
  args.offs = reinterpret_cast<const int64_t*>(offs_addr);
  args.sa = reinterpret_cast<const float*>(sa_addr);
  args.sb = reinterpret_cast<const float*>(sb_addr);
  args.out = reinterpret_cast<__nv_bfloat16*>(out_addr);
  args.sa_row = sa_row;
  args.sa_k = sa_k;
  args.sb_g = sb_g;
  args.sb_k = sb_k;
  args.sb_n = sb_n;
  args.ldo = ldo;
  args.M = int(M);
  args.N = int(N);
  args.K = int(K);
  args.G = int(G);
  args.fix = fix;
  if (counter) args.fix.flags = reinterpret_cast<int*>(counter);  // DYN's tile counter (no tail: flags unused)
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (counter) launch_types<1, false, true>(device, a_e5m2, b_e5m2, map_a, map_b, args, units, num_sms, s);
  else if (fix.tail_pct > 0) launch_types<1, true>(device, a_e5m2, b_e5m2, map_a, map_b, args, units, num_sms, s);
  else if (cluster == 1) launch_types<1, false>(device, a_e5m2, b_e5m2, map_a, map_b, args, units, num_sms, s);
  else launch_types<2, false>(device, a_e5m2, b_e5m2, map_a, map_b, args, units, num_sms, s);
}

}  // namespace

namespace turbo_dist_wgmma {
void register_bf16(py::module_& m);   // grouped_bf16.cu: the bf16 grouped GEMM
void register_wgrad(py::module_& m);  // grouped_wgrad.cu: its weight gradient
}  // namespace turbo_dist_wgmma

PYBIND11_MODULE(_fp8_wgmma, m) {
  m.doc() = "FP8 blockwise and bf16 grouped GEMMs for Hopper (WGMMA + TMA), group boundaries read on the GPU";
  m.def("grouped_blockwise", &grouped_blockwise, py::arg("device"), py::arg("stream"), py::arg("a"), py::arg("w"),
        py::arg("out"), py::arg("offs"), py::arg("scale_a"), py::arg("sa_row"), py::arg("sa_k"), py::arg("scale_w"),
        py::arg("sw_g"), py::arg("sw_k"), py::arg("sw_n"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("G"),
        py::arg("lda"), py::arg("ldw"), py::arg("w_group"), py::arg("ldo"), py::arg("a_e5m2"), py::arg("w_e5m2"),
        py::arg("num_sms"), py::arg("cluster") = 1, py::arg("ws") = 0, py::arg("flags") = 0, py::arg("ws_ctas") = 0,
        py::arg("tail_pct") = 0, py::arg("tail_waves") = 2, py::arg("timeout_s") = 100.0, py::arg("counter") = 0);
  m.attr("SMEM_BYTES") = kSmemBytes;
  m.attr("BLOCK_M") = kBM;
  m.attr("BLOCK_N") = kBN;
  turbo_dist_wgmma::register_bf16(m);
  turbo_dist_wgmma::register_wgrad(m);
}
