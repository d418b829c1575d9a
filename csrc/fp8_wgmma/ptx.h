// PTX wrappers for sm_90a kernels: shared-memory mbarriers, TMA loads (multicast included), cluster barriers and
// remote arrivals, WGMMA descriptors, the FP8 m64n128k32 and bf16 m64n256k16 / m64n128k16 WGMMAs. Included by the
// kernels of turbo_dist._fp8_wgmma (an anonymous namespace, like theirs: one copy per translation unit).
#pragma once

#include <cuda.h>

#include <cstdint>

namespace {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void bar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Wait until the barrier's phase of this parity has completed.
__device__ __forceinline__ void bar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::
          "r"(smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];" ::"r"(smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// The same load delivered to the same shared-memory offset (and barrier) of every CTA in cta_mask.
__device__ __forceinline__ void tma_load_3d_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                                      int c2, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, "
      "{%3, %4, %5}], [%2], %6;" ::"r"(smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "h"(cta_mask)
      : "memory");
}

__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                                      uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, "
      "{%3, %4}], [%2], %5;" ::"r"(smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "h"(cta_mask)
      : "memory");
}

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Arrive on the barrier at this shared-memory offset in CTA `rank` of the cluster (this one included). No
// .release.cluster: what the arrival publishes is that this warp's WGMMA has read the stage (wgmma.wait_group
// before it), not memory writes, and a cluster-scope release costs a memory barrier per arrival (ncu: "membar"
// became the first stall reason, the 2-CTA kernel 40% slower than one CTA per tile).
__device__ __forceinline__ void bar_arrive_cluster(uint64_t* bar, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(bar)), "r"(rank));
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}

// Four 8x8 b16 matrices to shared memory: lanes 8q .. 8q+7 give the row addresses of matrix q, each lane's r_q is
// its pair of matrix q (row lane / 4, columns 2 (lane % 4), +1): WGMMA's accumulator layout, packed to bf16.
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}

// WGMMA shared-memory descriptor of a K-major tile in 128-byte swizzle atoms (what TMA's SWIZZLE_128B writes
// for 128-byte rows): start address, stride between 8-row groups 1024 bytes, layout "128B swizzle".
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint64_t addr = smem_addr(p);
  return ((addr & 0x3FFFF) >> 4) | (1ull << 16) | (uint64_t(1024 >> 4) << 32) | (1ull << 62);
}

// Global-memory hand-off between CTAs of one grid (the stream-K fix-up): a gpu-scope release store and acquire
// load of a flag, the nanosecond timer bounding a wait, and a barrier of the two consumer warpgroups only.
__device__ __forceinline__ void st_release_gpu(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, 256;" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Wait until at most N committed WGMMA groups are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

// Keep the compiler from moving accumulator reads/writes across the asynchronous WGMMA.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define TD_ACC64_REGS \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, " \
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, " \
  "%62, %63}"
#define TD_ACC64_OUTS(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
  "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
  "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
  "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), \
  "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), \
  "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), \
  "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// D[64 x 128] (+)= A[64 x 32] * B[128 x 32]^T, FP8 operands from shared memory, f32 accumulators.
#define TD_WGMMA_64x128x32(ATYPE, BTYPE)                                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                  \
               "wgmma.mma_async.sync.aligned.m64n128k32.f32." ATYPE "." BTYPE " " TD_ACC64_REGS \
               ", %64, %65, p, 1, 1;\n}\n"                                                     \
               : TD_ACC64_OUTS(d)                                                              \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))

template <bool AE5M2, bool BE5M2>
__device__ __forceinline__ void mma_64x128x32(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  if constexpr (!AE5M2 && !BE5M2) {
    TD_WGMMA_64x128x32("e4m3", "e4m3");
  } else if constexpr (AE5M2 && !BE5M2) {
    TD_WGMMA_64x128x32("e5m2", "e4m3");
  } else if constexpr (!AE5M2 && BE5M2) {
    TD_WGMMA_64x128x32("e4m3", "e5m2");
  } else {
    TD_WGMMA_64x128x32("e5m2", "e5m2");
  }
}

// WGMMA shared-memory descriptor of an MN-major tile in 128-byte swizzle atoms (64 bf16 along MN x 8 along K,
// what TMA's SWIZZLE_128B writes for boxes of 64 MN elements): LBO = bytes from one 64-wide MN atom column to the
// next, SBO = bytes from one 8-deep K group to the next.
__device__ __forceinline__ uint64_t smem_desc_mn(const void* p, uint32_t lbo, uint32_t sbo) {
  const uint64_t addr = smem_addr(p);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(sbo >> 4) << 32) | (1ull << 62);
}

#define TD_ACC128_REGS                                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "   \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "   \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, "   \
  "%65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, "   \
  "%86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, " \
  "%106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, "      \
  "%123, %124, %125, %126, %127}"

// D[64 x 256] (+)= A[64 x 16] * B[256 x 16]^T, bf16 operands from shared memory (A K-major; B K-major, or
// MN-major when TRANS_B is "1"), f32 accumulators d[0] (columns 0-127) and d[1] (128-255).
#define TD_WGMMA_64x256x16_BF16(TRANS_A, TRANS_B)                                                             \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                                \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " TD_ACC128_REGS                       \
               ", %128, %129, p, 1, 1, " TRANS_A ", " TRANS_B ";\n}\n"                                       \
               : TD_ACC64_OUTS(d[0]), TD_ACC64_OUTS(d[1])                                                     \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))

// TRANS_A: A MN-major too (the weight gradient's x^T, grouped_wgrad.cu), its descriptor as B's (smem_desc_mn).
template <bool TRANS_B, bool TRANS_A = false>
__device__ __forceinline__ void mma_64x256x16_bf16(float (&d)[2][64], uint64_t desc_a, uint64_t desc_b,
                                                   int accumulate) {
  if constexpr (TRANS_A && TRANS_B) {
    TD_WGMMA_64x256x16_BF16("1", "1");
  } else if constexpr (TRANS_A) {
    TD_WGMMA_64x256x16_BF16("1", "0");
  } else if constexpr (TRANS_B) {
    TD_WGMMA_64x256x16_BF16("0", "1");
  } else {
    TD_WGMMA_64x256x16_BF16("0", "0");
  }
}

// TMA store of a 3-D box from shared memory (bulk-group completion): elements outside the tensor are not written.
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, const void* src, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(map),
               "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Wait until this thread's committed bulk stores have read their shared memory (READ) or completed.
template <bool READ>
__device__ __forceinline__ void bulk_wait_all() {
  if constexpr (READ) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
  else asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// Make this thread's generic-proxy writes to shared memory visible to the async proxy (WGMMA operand reads, TMA).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// D[64 x 128] (+)= A[64 x 16] * B[128 x 16]^T, bf16 (the bf16 kernel's half tiles: each consumer warpgroup takes
// half of a 64 x 256 tile's columns; the weight gradient's two pipelines), A and B K-major or MN-major as above.
#define TD_WGMMA_64x128x16_BF16(TRANS_A, TRANS_B)                                             \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " TD_ACC64_REGS        \
               ", %64, %65, p, 1, 1, " TRANS_A ", " TRANS_B ";\n}\n"                         \
               : TD_ACC64_OUTS(d)                                                             \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))

template <bool TRANS_B, bool TRANS_A = false>
__device__ __forceinline__ void mma_64x128x16_bf16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  if constexpr (TRANS_A && TRANS_B) {
    TD_WGMMA_64x128x16_BF16("1", "1");
  } else if constexpr (TRANS_A) {
    TD_WGMMA_64x128x16_BF16("1", "0");
  } else if constexpr (TRANS_B) {
    TD_WGMMA_64x128x16_BF16("0", "1");
  } else {
    TD_WGMMA_64x128x16_BF16("0", "0");
  }
}

}  // namespace
