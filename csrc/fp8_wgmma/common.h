// What the Hopper kernels of turbo_dist._fp8_wgmma share: the tile shape and order (128 x 256 tiles, a group's
// rows start a new tile, bands of row tiles), the 16-byte bf16 epilogue, and the host side of TMA descriptors
// and cluster launches.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "ptx.h"

namespace {

constexpr int kBM = 128;              // tile rows: two consumer warpgroups of 64
constexpr int kBN = 256;              // tile columns
constexpr int kThreads = 3 * 128;     // producer warpgroup + two consumer warpgroups
constexpr int kBand = 8;              // row tiles per band of the tile order
constexpr int kSmemAlign = 1024;      // 128-byte swizzle atoms: 8 rows x 128 bytes

// Walks the units in increasing index; every warp of the cluster walks the same sequence. A unit is CLUSTER row
// tiles (one per CTA of the cluster, sharing the weight tile) x one column tile; tiles of BM x BN (the tall tiles
// of grouped_bf16.cu: 256 x 128).
template <int CLUSTER, int BM = kBM, int BN = kBN>
struct TileWalk {
  static constexpr int kUnitRows = BM * CLUSTER;
  static constexpr int kBandUnits = kBand / CLUSTER;
  int g = -1, units_before = 0, group_start = 0, group_end = 0, row_units = 0;

  // Position on unit t (>= every earlier t); false when t is past the last unit.
  template <class P>  // P: the kernel's arguments (offs, M, G read here)
  __device__ __forceinline__ bool seek(const P& p, int col_tiles, int t) {
    while (g < p.G && (g < 0 || t >= units_before + row_units * col_tiles)) {
      if (g >= 0) units_before += row_units * col_tiles;
      ++g;
      if (g < p.G) {  // counts on the GPU are not checked on the host: clamp, so bad ones never write past M
        group_start = group_end;
        group_end = static_cast<int>(max(int64_t(group_start), min(p.offs[g], int64_t(p.M))));
        row_units = (group_end - group_start + kUnitRows - 1) / kUnitRows;
      }
    }
    return g < p.G;
  }

  // Every unit of the launch (the tile count the stream-K split needs): the groups' row units x col_tiles.
  template <class P>
  __device__ __forceinline__ static int count(const P& p, int col_tiles) {
    int start = 0, rows = 0;
    for (int g = 0; g < p.G; ++g) {
      const int end = static_cast<int>(max(int64_t(start), min(p.offs[g], int64_t(p.M))));
      rows += (end - start + kUnitRows - 1) / kUnitRows;
      start = end;
    }
    return rows * col_tiles;
  }

  // (first row, first column) of unit t in the current group: bands of kBandUnits row units, rows fastest.
  __device__ __forceinline__ void coords(int col_tiles, int t, int& m0, int& n0) const {
    const int u = t - units_before;
    const int band = u / (kBandUnits * col_tiles);
    const int first = band * kBandUnits;
    const int height = min(kBandUnits, row_units - first);
    const int v = u - band * kBandUnits * col_tiles;
    m0 = group_start + (first + v % height) * kUnitRows;
    n0 = (v / height) * BN;
  }
};

// ------------------------------------------------------------------------------------ the stream-K tail
// A persistent launch of P CTAs over T tiles of k_steps K steps each ends with a partial wave when T % P != 0:
// T = 8 x 132 + 32 leaves 100 SMs idle for the last tile's time. With a stream-K tail the first waves stay whole
// tiles, round robin ("data parallel"), and the last tiles are cut into P equal runs of K steps, one per CTA:
// waves 2 (Fixup::waves) cuts the last full wave and the partial one (P + T % P tiles, runs of at least a tile:
// a tile in at most two pieces), waves 1 the partial one alone (the full waves keep their order and L2 reuse; a
// tile in up to P / (T % P) + 1 pieces). A tile's head (K steps 0 .. x) ends the run of CTA c; its other pieces
// start the runs of CTAs c + 1, c + 2, ..., which publish their fp32 partial sums first thing after their whole
// tiles (Fixup::publish, a flag per CTA); CTA c, at the end of its run, adds them (Fixup::merge) and stores the
// tile. Nobody waits before publishing, so no chain of waits forms; a wait is bounded by Fixup::timeout_ns.
// Used when tail_pct > 0 and T % P <= tail_pct % of P.
struct Fixup {
  float* ws = nullptr;    // [P][kBM * kBN] fp32 partial sums, in the consumers' register order
  int* flags = nullptr;   // [P] zeroed before the launch; CTA c sets flags[c] once its partial is written
  int64_t timeout_ns = 0;
  int tail_pct = 0;       // 0: no stream-K tail
  int waves = 2;          // waves cut into runs: 2 the last full one and the partial one, 1 the partial one

  // The 256 consumer threads (ctid 0..255) of this CTA write their accumulators and raise the CTA's flag.
  __device__ __forceinline__ void publish(const float (&acc)[2][64], int cta, int ctid) const {
    float* w = ws + int64_t(cta) * (kBM * kBN) + ctid;
#pragma unroll
    for (int i = 0; i < 128; ++i) __stcg(w + i * 256, acc[i / 64][i % 64]);
    __threadfence();
    consumers_sync();
    if (ctid == 0) st_release_gpu(flags + cta, 1);
  }

  // Wait for the partial sums of CTAs from .. last (each thread acquires their flags itself) and add them.
  __device__ __forceinline__ void merge(float (&acc)[2][64], int from, int last, int ctid) const {
    for (int c = from; c <= last; ++c) {
      const uint64_t t0 = global_ns();
      while (ld_acquire_gpu(flags + c) == 0) {
        // past the bound (fewer SMs free than CTAs launched?) the kernel traps: CUDA reports a launch failure
        // instead of a hang. No printf: a call anywhere in the kernel makes ptxas serialize its WGMMAs (C7510)
        if (global_ns() - t0 > uint64_t(timeout_ns)) __trap();
        __nanosleep(64);
      }
      const float* w = ws + int64_t(c) * (kBM * kBN) + ctid;
#pragma unroll
      for (int i = 0; i < 128; ++i) acc[i / 64][i % 64] += __ldcg(w + i * 256);
    }
  }
};

// The stream-K split of a launch: dp whole tiles first, then runs of `run` K steps from step dp * k_steps; run 0:
// no tail (whole tiles until TileWalk::seek finds no more).
struct TailSplit {
  int dp = 0, run = 0;
  __device__ __forceinline__ TailSplit(int tiles, int stride, int k_steps, const Fixup& fix) {
    const int full = tiles / stride, rest = tiles % stride;
    if (fix.tail_pct > 0 && full >= fix.waves - 1 && rest > 0 && rest * 100 <= fix.tail_pct * stride) {
      dp = (full - (fix.waves - 1)) * stride;
      run = ((tiles - dp) * k_steps + stride - 1) / stride;
    }
  }
  // The last CTA holding a piece of tile t (whose head is the caller's): the owner of its last K step.
  __device__ __forceinline__ int last_owner(int t, int k_steps) const {
    return ((t + 1) * k_steps - 1 - dp * k_steps) / run;
  }
};

// Piece i without the tail (TAIL false: the instantiation every default launch runs, whole tiles round robin, as
// before the tail existed) or with it (work_piece below, the tile count read from shared memory).
template <bool TAIL>
__device__ __forceinline__ bool next_piece(int i, const int* tiles, int first, int stride, int k_steps,
                                           const struct Fixup& fix, int& t, int& kb0, int& kb1);

// Piece i of one CTA's (or cluster's) work: whole tiles t = first, first + stride, ... below dp, then its
// stream-K run of K steps [start, end) over the tiles from dp on (global step index t * k_steps + kb; make_fixup
// keeps every launch's units x k_steps below 2^31). Tile t, K steps kb0 .. kb1 (0 .. k_steps for a whole tile);
// false when done. Recomputed from the piece index at each tile (a few integer divisions) instead of kept in
// registers: the FP8 kernel's consumers have none to spare. tiles: every unit of the launch (TileWalk::count),
// 0 when the tail is off.
__device__ __forceinline__ bool work_piece(int i, int tiles, int first, int stride, int k_steps, const Fixup& fix,
                                           int& t, int& kb0, int& kb1) {
  const TailSplit split(tiles, stride, k_steps, fix);
  const int whole = split.run == 0 ? INT_MAX : first < split.dp ? (split.dp - first + stride - 1) / stride : 0;
  if (i < whole) {
    t = first + i * stride;
    kb0 = 0;
    kb1 = k_steps;
    return true;
  }
  const int start = split.dp * k_steps + first * split.run;
  const int end = min(tiles * k_steps, start + split.run);
  const int j = i - whole, t0 = start / k_steps;
  t = t0 + j;
  kb0 = j == 0 ? start - t0 * k_steps : 0;
  if (t * k_steps + kb0 >= end) return false;
  kb1 = min(k_steps, end - t * k_steps);
  return true;
}

template <bool TAIL>
__device__ __forceinline__ bool next_piece(int i, const int* tiles, int first, int stride, int k_steps,
                                           const Fixup& fix, int& t, int& kb0, int& kb1) {
  if constexpr (TAIL) {
    return work_piece(i, *tiles, first, stride, k_steps, fix, t, kb0, kb1);
  } else {
    t = first + i * stride;
    kb0 = 0;
    kb1 = k_steps;
    return true;
  }
}

// Piece i of a kernel's work, on a group's tile, in the names both grouped kernels use (smem, first_unit,
// unit_stride, k_steps, p, t, kb0, kb1, walk, col_tiles): a macro, as a lambda capturing t, kb0, kb1 puts the FP8
// consumers over their registers.
#define TD_NEXT_PIECE(i)                                                                          \
  (next_piece<TAIL>(i, smem.tiles, first_unit, unit_stride, k_steps, p.fix, t, kb0, kb1) && \
   walk.seek(p, col_tiles, t))

// ------------------------------------------------------------------------------------- dynamic tiles
// Tiles handed out at run time (grouped_bf16.cu and grouped_blockwise.cu with DYN): the producer takes the first
// wave by block index, then one atomicAdd on `counter` per tile, and passes the tile index to the consumers in the
// slot of the tile's first stage (published by that stage's mbarrier arrival, release at CTA scope); past the last
// tile it writes -1 into the next stage's slot and arrives without data. Producer side: tile t of piece i, false
// when done (after the -1).
template <class P, class WALK, class RING>
__device__ __forceinline__ bool producer_next_tile(int i, int* counter, const P& p, WALK& walk, int col_tiles,
                                                   int k_steps, int* slot, uint64_t* full, uint64_t* empty,
                                                   RING& ring, int& t, int& kb0, int& kb1) {
  t = i == 0 ? int(blockIdx.x) : int(gridDim.x) + atomicAdd(counter, 1);
  kb0 = 0;
  kb1 = k_steps;
  if (walk.seek(p, col_tiles, t)) return true;
  bar_wait(&empty[ring.s], ring.phase ^ 1);
  slot[ring.s] = -1;
  bar_arrive(&full[ring.s]);
  return false;
}

// Consumer side: the next tile from the slot of the ring's current stage (its wait passes again at once in the
// K loop); false at -1.
template <class P, class WALK, class RING>
__device__ __forceinline__ bool consumer_next_tile(const P& p, WALK& walk, int col_tiles, int k_steps,
                                                   const int* slot, uint64_t* full, RING& ring, int& t, int& kb0,
                                                   int& kb1) {
  bar_wait(&full[ring.s], ring.phase);
  t = slot[ring.s];
  if (t < 0) return false;
  walk.seek(p, col_tiles, t);
  kb0 = 0;
  kb1 = k_steps;
  return true;
}

// ------------------------------------------------------------------------------------- the stage pipeline
// The ring of shared-memory stages the producer and the consumers walk in the same order: the stage and the
// parity of its current pass.
template <int STAGES>
struct StageRing {
  int s = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++s == STAGES) {
      s = 0;
      phase ^= 1;
    }
  }
};

// The dynamic shared memory of a kernel, aligned to the 1 KB of a 128-byte swizzle pattern: STAGES A tiles, then
// STAGES B tiles, then the full and empty barriers.
template <int STAGES, int A_BYTES, int B_BYTES>
struct StageSmem {
  uint8_t* a;
  uint8_t* b;
  uint64_t* full;
  uint64_t* empty;
  int* tiles;  // the launch's unit count for the stream-K tail (work_piece), written before the first sync
  int* slot;   // [STAGES] dynamic tile order: the tile whose first K step stage s holds (-1: no more tiles)
  static constexpr int kBytes = STAGES * (A_BYTES + B_BYTES) + kSmemAlign + 2 * STAGES * 8 + 16 + 4 * STAGES;

  __device__ __forceinline__ explicit StageSmem(uint8_t* raw) {
    uint8_t* base = raw + ((kSmemAlign - smem_addr(raw) % kSmemAlign) % kSmemAlign);
    a = base;
    b = base + STAGES * A_BYTES;
    full = reinterpret_cast<uint64_t*>(base + STAGES * (A_BYTES + B_BYTES));
    empty = full + STAGES;
    tiles = reinterpret_cast<int*>(empty + STAGES);
    slot = tiles + 4;
  }
};

// Thread 0 sets up the stage barriers: full[s] completes on the producer's expect_tx arrival and TMA's bytes,
// empty[s] on one arrival per consumer warp of every CTA reading the stage. Then the cluster (or CTA) syncs, so a
// peer's barriers exist before anything reaches them.
template <int STAGES, int CLUSTER>
__device__ __forceinline__ void init_stage_barriers(uint64_t* full, uint64_t* empty) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      bar_init(&full[s], 1);
      bar_init(&empty[s], 8 * CLUSTER);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if constexpr (CLUSTER > 1) cluster_sync();
  else __syncthreads();
}

// The producer's exit with clusters: stay until the peer's consumers have released every stage (their arrivals
// reach our barriers, our loads reach theirs).
template <int STAGES, int CLUSTER>
__device__ __forceinline__ void drain_stages(uint64_t* empty, StageRing<STAGES>& ring) {
  if constexpr (CLUSTER > 1) {
    for (int i = 0; i < STAGES; ++i) {
      bar_wait(&empty[ring.s], ring.phase ^ 1);
      ring.advance();
    }
  }
}

// A consumer warp is done with `stage` (in every CTA whose loads it holds).
template <int CLUSTER>
__device__ __forceinline__ void release_stage(uint64_t* empty, int stage, int lane) {
  if (lane == 0) {
    if constexpr (CLUSTER > 1) {
#pragma unroll
      for (uint32_t r = 0; r < CLUSTER; ++r) bar_arrive_cluster(&empty[stage], r);
    } else {
      bar_arrive(&empty[stage]);
    }
  }
}

// After a stage's WGMMAs are issued (the weight-gradient kernels and grouped_bf16.cu's tall tiles; the FP8 one
// promotes in between, and grouped_bf16.cu's 128 x 256 kernel keeps its own copy of these lines: through the helper
// ptxas allocated and scheduled its measured kernels differently): commit them, wait until the previous stage's
// are done and hand that stage back, keep this one in flight (prev), move the ring on.
template <int CLUSTER, int STAGES, int FRAGS>
__device__ __forceinline__ void stage_issued(float (&acc)[FRAGS][64], uint64_t* empty, int& prev, int s,
                                             StageRing<STAGES>& ring, int lane) {
  wgmma_commit();
  wgmma_wait<1>();  // the previous stage's products are done: hand it back
#pragma unroll
  for (int f = 0; f < FRAGS; ++f) fence_regs(acc[f]);
  if (prev >= 0) release_stage<CLUSTER>(empty, prev, lane);
  prev = s;
  ring.advance();
}

// After a tile's last stage: wait for all its WGMMAs, hand the last stage back.
template <int CLUSTER, int FRAGS>
__device__ __forceinline__ void stages_done(float (&acc)[FRAGS][64], uint64_t* empty, int prev, int lane) {
  wgmma_wait<0>();
#pragma unroll
  for (int f = 0; f < FRAGS; ++f) fence_regs(acc[f]);
  if (prev >= 0) release_stage<CLUSTER>(empty, prev, lane);
}

// A unit with no rows for this CTA (rank 1 of a group's odd last row tile): hand its stages back unread.
template <int STAGES, int CLUSTER>
__device__ __forceinline__ void skip_stages(uint64_t* full, uint64_t* empty, StageRing<STAGES>& ring, int k_steps,
                                            int lane) {
  for (int kb = 0; kb < k_steps; ++kb) {
    bar_wait(&full[ring.s], ring.phase);
    release_stage<CLUSTER>(empty, ring.s, lane);
    ring.advance();
  }
}

// Two floats as a bf16 pair (lo in the low half), round to nearest.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Lane q of a quad (4 lanes holding the same two rows of WGMMA's m64n128 fragment acc[r], 2 columns of each of 4
// 8-column chunks per row) gets all 8 columns of chunk 4g+q of row r0 (h 0: acc pairs 0, 1) or r1 (h 1: pairs 2,
// 3) as bf16: a 4x4 transpose by xor shuffles (16-byte stores, a quarter of the instructions and whole 32-byte
// sectors against each thread's 4-byte column pairs: 11-13% faster on fc2's K=2048, 0-4% on fc1,
// benchmarks/results/diag_fp8_wgmma_stores_h200.json). Selects on named values, not a runtime index (which would
// put v in local memory).
__device__ __forceinline__ uint4 quad_chunk(const float (&frag)[64], int g, int h, int q) {
  uint32_t v[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    v[c] = pack_bf16(frag[4 * (4 * g + c) + 2 * h], frag[4 * (4 * g + c) + 2 * h + 1]);
  }
  // round i: lane q sends its pair of chunk q^i and gets lane q^i's pair of chunk q (position q^i)
  uint32_t o0 = 0u, o1 = 0u, o2 = 0u, o3 = 0u;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int x = q ^ i;
    const uint32_t send = (x & 2) ? ((x & 1) ? v[3] : v[2]) : ((x & 1) ? v[1] : v[0]);
    const uint32_t got = i ? __shfl_xor_sync(0xffffffffu, send, i) : send;
    o0 = x == 0 ? got : o0;
    o1 = x == 1 ? got : o1;
    o2 = x == 2 ? got : o2;
    o3 = x == 3 ? got : o3;
  }
  return make_uint4(o0, o1, o2, o3);
}

// The epilogue of a 128 x 256 tile: a consumer warpgroup's 64 x 256 fp32 accumulators (acc[r][i]: WGMMA's
// m64n128 fragment of columns r*128 .. r*128+127; the same registers as one m64n256 fragment) to bf16 out: this
// thread's rows r0 and r1 (= r0 + 8) where below row_end, its columns of n0 .. n0+255 inside N (a multiple of 8:
// whole 8-column chunks), 16 bytes a store (quad_chunk). FRAGS 1: acc[0] alone, columns n0 .. n0+127 (a half
// tile's share, grouped_bf16.cu). FIRST: the first fragment stored (FRAGS 1, FIRST 1: acc[1] to columns n0 ..
// n0+127, the second 64 rows of a tall tile's warpgroup).
template <int FRAGS = 2, int FIRST = 0>
__device__ __forceinline__ void store_tile(const float (&acc)[2][64], __nv_bfloat16* out, int64_t ldo, int N, int n0,
                                           int r0, int r1, int row_end, int lane) {
  static_assert(FIRST + FRAGS <= 2, "two fragments");
  const bool ok0 = r0 < row_end, ok1 = r1 < row_end;
  const int q = lane % 4;
#pragma unroll
  for (int r = 0; r < FRAGS; ++r) {
#pragma unroll
    for (int g = 0; g < 4; ++g) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4 chunk = quad_chunk(acc[FIRST + r], g, h, q);
        const int col = n0 + r * 128 + (4 * g + q) * 8;
        const int row = h ? r1 : r0;
        if (col < N && (h ? ok1 : ok0)) *reinterpret_cast<uint4*>(out + int64_t(row) * ldo + col) = chunk;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ host
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("turbo_dist._fp8_wgmma: ") + what + " failed: " + cudaGetErrorString(err));
}

inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                                             cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &found);
#endif
    if (err == cudaSuccess && found == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  });
  if (!fn) throw std::runtime_error("turbo_dist._fp8_wgmma: the CUDA driver has no cuTensorMapEncodeTiled");
  return fn;
}

// A tensor of `rank` (<= 5) dims (innermost first, byte strides of the outer dims) of one- or two-byte elements,
// read in boxes of 128-byte rows, written to shared memory in 128-byte swizzle atoms; out-of-bounds elements
// read as zero.
inline CUtensorMap make_map(uint64_t addr, int rank, const uint64_t* dims, const uint64_t* strides, const uint32_t* box,
                     CUtensorMapDataType dtype = CU_TENSOR_MAP_DATA_TYPE_UINT8) {
  CUtensorMap map;
  const uint32_t elem_strides[5] = {1, 1, 1, 1, 1};
  const CUresult res = encode_tiled()(&map, dtype, rank, reinterpret_cast<void*>(addr), dims,
                                      strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS)
    throw std::runtime_error("turbo_dist._fp8_wgmma: cuTensorMapEncodeTiled failed (CUresult " +
                             std::to_string(int(res)) + "): operands must be 16-byte aligned, strides too");
  return map;
}

// The launch configuration of a persistent kernel in clusters of `cluster` CTAs along x.
inline cudaLaunchConfig_t cluster_config(int grid, int cluster, int smem_bytes, cudaStream_t stream,
                                         cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

// The checks both host entry points make before building a descriptor (sizes in elements, addresses in bytes;
// the cluster size is checked first, before the early return of an empty problem).
inline void check_launch(int64_t M, int64_t N, int64_t K, int64_t G, int64_t ldo, uint64_t out_addr, int num_sms,
                         int cluster) {
  if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX || G > INT32_MAX)
    throw std::invalid_argument("turbo_dist._fp8_wgmma: M, N, K and G must fit in 32 bits");
  if (N % 8 || ldo % 8 || out_addr % 16)
    throw std::invalid_argument("turbo_dist._fp8_wgmma: N and the output's row stride must be multiples of 8 "
                                "elements, the output 16-byte aligned");
  if (num_sms < cluster) throw std::invalid_argument("turbo_dist._fp8_wgmma: num_sms must be >= cluster");
}

// The stream-K tail's buffers, checked: ws holds ws_ctas x kBM x kBN fp32 partials, flags ws_ctas zeroed ints;
// tail_pct 0 (no tail) needs neither. One CTA per tile only (a cluster's CTAs would split differently). steps: the
// launch's units x K steps; from 2^31 on the kernels' 32-bit step indices would overflow, so no tail.
inline Fixup make_fixup(uint64_t ws, uint64_t flags, int ws_ctas, int tail_pct, int waves, double timeout_s,
                        int num_sms, int cluster, int64_t steps) {
  Fixup fix;
  if (tail_pct < 0 || tail_pct > 100)
    throw std::invalid_argument("turbo_dist._fp8_wgmma: tail_pct must be in 0..100");
  if (waves != 1 && waves != 2) throw std::invalid_argument("turbo_dist._fp8_wgmma: tail_waves must be 1 or 2");
  if (tail_pct == 0) return fix;
  if (cluster != 1) throw std::invalid_argument("turbo_dist._fp8_wgmma: the stream-K tail needs cluster 1");
  if (!ws || !flags || ws % 16 || flags % 4 || ws_ctas < num_sms)
    throw std::invalid_argument("turbo_dist._fp8_wgmma: the stream-K tail needs ws (num_sms x " +
                                std::to_string(kBM * kBN) + " fp32) and flags (num_sms zeroed int32), ws_ctas >= "
                                "num_sms");
  if (!(timeout_s > 0.0 && timeout_s < 1e9))
    throw std::invalid_argument("turbo_dist._fp8_wgmma: timeout_s must be positive and finite");
  fix.ws = reinterpret_cast<float*>(ws);
  fix.flags = reinterpret_cast<int*>(flags);
  fix.timeout_ns = int64_t(timeout_s * 1e9);
  fix.tail_pct = steps < INT32_MAX ? tail_pct : 0;
  fix.waves = waves;
  return fix;
}

// Units of work (CLUSTER row tiles x one column tile): at most one row unit more per group than M's rows need,
// since each group starts a unit. bm, bn: the tile (the tall tiles of grouped_bf16.cu: 256 x 128).
inline int64_t unit_count(int64_t M, int64_t N, int64_t G, int cluster, int bm = kBM, int bn = kBN) {
  const int64_t unit_rows = int64_t(bm) * cluster;
  return ((M + unit_rows - 1) / unit_rows + G) * ((N + bn - 1) / bn);
}

// Launch KERNEL persistently in clusters of CLUSTER CTAs: as many clusters as fit on the GPU at once (counted,
// with the shared-memory limit raised, once per device for this kernel), at most one CTA per SM, no more than
// there are units.
template <auto KERNEL, int CLUSTER, int SMEM_BYTES, class... Args>
void launch_persistent(int device, int64_t units, int num_sms, cudaStream_t stream, const Args&... args) {
  static std::mutex mutex;  // per kernel
  static std::map<int, int> fit_per_device;
  int fit;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = fit_per_device.find(device);
    if (it == fit_per_device.end()) {
      check_cuda(cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES),
                 "cudaFuncSetAttribute(max dynamic shared memory)");
      int n = 0;
      cudaLaunchAttribute attr[1];
      const cudaLaunchConfig_t config = cluster_config(1024, CLUSTER, SMEM_BYTES, nullptr, attr);
      check_cuda(cudaOccupancyMaxActiveClusters(&n, KERNEL, &config), "cudaOccupancyMaxActiveClusters");
      if (n < 1)
        throw std::runtime_error("turbo_dist._fp8_wgmma: no cluster of " + std::to_string(CLUSTER) +
                                 " CTAs of this kernel fits on the GPU");
      it = fit_per_device.emplace(device, n).first;
    }
    fit = it->second;
  }
  const int grid = CLUSTER * int(std::min<int64_t>({units, int64_t(fit), int64_t(num_sms / CLUSTER)}));
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t config = cluster_config(grid, CLUSTER, SMEM_BYTES, stream, attr);
  check_cuda(cudaLaunchKernelEx(&config, KERNEL, args...), "kernel launch");
}

}  // namespace
