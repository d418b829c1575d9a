// The few host-side SHMEM calls turbo_dist needs, mapped onto NVSHMEM (CUDA) or rocSHMEM (ROCm).
//
// Build with exactly one of TURBO_DIST_NVSHMEM or TURBO_DIST_ROCSHMEM defined (setup.py does).
// Only the host library is used: initialisation goes through the host-library entry points
// (nvshmemx_hostlib_init_attr), so no device code is linked and kernels reach peers through
// the addresses that `ptr()` returns. Teams are passed to Python as int64 handles.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(TURBO_DIST_NVSHMEM) && defined(TURBO_DIST_ROCSHMEM)
#error "define only one of TURBO_DIST_NVSHMEM and TURBO_DIST_ROCSHMEM"
#elif defined(TURBO_DIST_NVSHMEM)
#include <nvshmem_host.h>
#elif defined(TURBO_DIST_ROCSHMEM)
#include <array>
#include <rocshmem/rocshmem.hpp>
#else
#error "define TURBO_DIST_NVSHMEM or TURBO_DIST_ROCSHMEM"
#endif

namespace tdshmem {

#if defined(TURBO_DIST_NVSHMEM)

constexpr const char* kBackend = "nvshmem";
constexpr int kDLDeviceType = 2;  // DLPack kDLCUDA
using team_t = nvshmem_team_t;
using uniqueid_t = nvshmemx_uniqueid_t;
constexpr size_t kUniqueIdBytes = sizeof(nvshmemx_uniqueid_t);

// nvshmemx_status values (stable since NVSHMEM 2.x; the header's own string table is newer than 3.4).
inline const char* status_name(int status) {
  static const char* const kNames[] = {"NVSHMEMX_SUCCESS",
                                       "NVSHMEMX_ERROR_INVALID_VALUE",
                                       "NVSHMEMX_ERROR_OUT_OF_MEMORY",
                                       "NVSHMEMX_ERROR_NOT_SUPPORTED",
                                       "NVSHMEMX_ERROR_SYMMETRY",
                                       "NVSHMEMX_ERROR_GPU_NOT_SELECTED",
                                       "NVSHMEMX_ERROR_COLLECTIVE_LAUNCH_FAILED",
                                       "NVSHMEMX_ERROR_INTERNAL"};
  return (status >= 0 && status < 8) ? kNames[status] : "unknown status";
}

inline int get_uniqueid(uniqueid_t* uid) {
  *uid = NVSHMEMX_UNIQUEID_INITIALIZER;
  return nvshmemx_get_uniqueid(uid);
}
inline int init_with_uniqueid(uniqueid_t* uid, int rank, int nranks) {
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int status = nvshmemx_set_attr_uniqueid_args(rank, nranks, uid, &attr);
  if (status != 0) return status;
  return nvshmemx_hostlib_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);
}
inline bool is_initialized() {
  int s = nvshmemx_init_status();
  return s >= NVSHMEM_STATUS_IS_INITIALIZED && s != NVSHMEM_STATUS_INVALID;
}
inline void finalize() { nvshmemx_hostlib_finalize(); }
inline int my_pe() { return nvshmem_my_pe(); }
inline int n_pes() { return nvshmem_n_pes(); }
inline void* malloc(size_t n) { return nvshmem_malloc(n); }
inline void free(void* p) { nvshmem_free(p); }
inline void* ptr(void* p, int pe) { return nvshmem_ptr(p, pe); }
inline void barrier_all() { nvshmem_barrier_all(); }
inline void barrier_all_on_stream(void* stream) {
  nvshmemx_barrier_all_on_stream(reinterpret_cast<cudaStream_t>(stream));
}
inline void quiet() { nvshmem_quiet(); }
inline void quiet_on_stream(void* stream) { nvshmemx_quiet_on_stream(reinterpret_cast<cudaStream_t>(stream)); }
inline void fence() { nvshmem_fence(); }
inline void version(int* major, int* minor, int* patch) { nvshmemx_vendor_get_version_info(major, minor, patch); }

inline team_t team_world() { return NVSHMEM_TEAM_WORLD; }
inline team_t team_shared() { return NVSHMEM_TEAM_SHARED; }
inline team_t team_invalid() { return NVSHMEM_TEAM_INVALID; }
inline int team_my_pe(team_t t) { return nvshmem_team_my_pe(t); }
inline int team_n_pes(team_t t) { return nvshmem_team_n_pes(t); }
inline int team_translate_pe(team_t src, int pe, team_t dst) { return nvshmem_team_translate_pe(src, pe, dst); }
inline int team_split_strided(team_t parent, int start, int stride, int size, team_t* out) {
  return nvshmem_team_split_strided(parent, start, stride, size, nullptr, 0, out);
}
inline void team_destroy(team_t t) { nvshmem_team_destroy(t); }
inline int64_t team_to_int(team_t t) { return static_cast<int64_t>(t); }
inline team_t team_from_int(int64_t v) { return static_cast<team_t>(v); }

#else  // TURBO_DIST_ROCSHMEM

constexpr const char* kBackend = "rocshmem";
constexpr int kDLDeviceType = 10;  // DLPack kDLROCM
using team_t = rocshmem::rocshmem_team_t;
using uniqueid_t = rocshmem::rocshmem_uniqueid_t;
constexpr size_t kUniqueIdBytes = sizeof(rocshmem::rocshmem_uniqueid_t);

inline const char* status_name(int status) { return status == 0 ? "ROCSHMEM_SUCCESS" : "rocSHMEM error"; }

inline int get_uniqueid(uniqueid_t* uid) { return rocshmem::rocshmem_get_uniqueid(uid); }
inline int init_with_uniqueid(uniqueid_t* uid, int rank, int nranks) {
  rocshmem::rocshmem_init_attr_t attr{};
  int status = rocshmem::rocshmem_set_attr_uniqueid_args(rank, nranks, uid, &attr);
  if (status != 0) return status;
  return rocshmem::rocshmem_init_attr(rocshmem::ROCSHMEM_INIT_WITH_UNIQUEID, &attr);
}
// rocSHMEM has no init-status query; the binding tracks it (see shmem.cpp).
inline bool is_initialized() { return false; }
inline void finalize() { rocshmem::rocshmem_finalize(); }
inline int my_pe() { return rocshmem::rocshmem_my_pe(); }
inline int n_pes() { return rocshmem::rocshmem_n_pes(); }
inline void* malloc(size_t n) { return rocshmem::rocshmem_malloc(n); }
inline void free(void* p) { rocshmem::rocshmem_free(p); }
inline void* ptr(void* p, int pe) { return rocshmem::rocshmem_ptr(p, pe); }
inline void barrier_all() { rocshmem::rocshmem_barrier_all(); }
// rocSHMEM has no stream-ordered host barrier: drain the stream, then barrier.
inline void barrier_all_on_stream(void* stream) {
  (void)hipStreamSynchronize(reinterpret_cast<hipStream_t>(stream));
  rocshmem::rocshmem_barrier_all();
}
inline void quiet() { rocshmem::rocshmem_quiet(); }
inline void quiet_on_stream(void* stream) {
  (void)hipStreamSynchronize(reinterpret_cast<hipStream_t>(stream));
  rocshmem::rocshmem_quiet();
}
inline void fence() { rocshmem::rocshmem_fence(); }
inline void version(int* major, int* minor, int* patch) { *major = 3; *minor = 0; *patch = 0; }

inline team_t team_world() { return rocshmem::ROCSHMEM_TEAM_WORLD; }
inline team_t team_shared() { return rocshmem::ROCSHMEM_TEAM_INVALID; }  // no predefined node team
inline team_t team_invalid() { return rocshmem::ROCSHMEM_TEAM_INVALID; }
inline int team_my_pe(team_t t) { return rocshmem::rocshmem_team_my_pe(t); }
inline int team_n_pes(team_t t) { return rocshmem::rocshmem_team_n_pes(t); }
inline int team_translate_pe(team_t src, int pe, team_t dst) {
  return rocshmem::rocshmem_team_translate_pe(src, pe, dst);
}
inline int team_split_strided(team_t parent, int start, int stride, int size, team_t* out) {
  return rocshmem::rocshmem_team_split_strided(parent, start, stride, size, nullptr, 0, out);
}
inline void team_destroy(team_t t) { rocshmem::rocshmem_team_destroy(t); }
inline int64_t team_to_int(team_t t) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(t)); }
inline team_t team_from_int(int64_t v) { return reinterpret_cast<team_t>(static_cast<intptr_t>(v)); }

#endif

}  // namespace tdshmem
