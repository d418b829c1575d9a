// turbo_dist._cublaslt: FP8 BLOCKWISE grouped GEMM (MoE experts) as one cuBLASLt blockwise GEMM per group,
// the loop over groups in C++ with cached descriptors and algorithms.
//
// torch has no grouped blockwise FP8 op; calling torch._scaled_mm once per group works but costs ~55-90 us of
// host time per group (it builds descriptors and asks cuBLASLt for a heuristic on every call), more than the
// GPU time of a small group. Here a plan (matmul descriptor, three layouts, the heuristic's algorithm) is built
// once per distinct problem (device, N, K, group rows, strides, workspace) and reused; a call then costs one
// descriptor update (the two scale pointers) and one cublasLtMatmul per non-empty group.
//
// Built without torch headers: tensors travel as addresses (Python ints), the caller (backend "cublaslt" in
// turbo_dist/ops/fp8_grouped.py) checks dtypes, shapes, strides, alignment and devices first and lays the
// scales out; the row counts are checked against M and G here too (they index memory).
// Errors raise RuntimeError with cuBLASLt's status name.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cublasLt.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("turbo_dist._cublaslt: ") + what + " failed: " +
                             cublasLtGetStatusString(status) + " (status " + std::to_string(int(status)) + ")");
  }
}

// One group's problem in cuBLASLt's column-major terms (what torch._scaled_mm does for a row-major a and a
// column-major b): D[N, rows] = op(A)[N, K] * B[K, rows] with A = the expert's weight (stored [N, K] row-major,
// ld ldw, transposed), B = the group's activations (stored [rows, K] row-major, ld lda), D = the group's output
// rows (stored [rows, N] row-major, ld ldo). Scales: A 128x128 blocks (BLK128x128_32F, [N/128][ld4] with the
// K blocks contiguous), B 1x128 blocks (VEC128_32F, [K/128][rows] with the rows contiguous).
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

// device, N, K, rows, lda, ldw, ldo, workspace bytes
using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

constexpr size_t kMaxPlans = 4096;  // distinct row counts x shapes; cleared (rebuilt on demand) beyond this

std::mutex g_mutex;
std::map<int, cublasLtHandle_t> g_handles;
std::map<Key, std::unique_ptr<Plan>> g_plans;

cublasLtHandle_t handle_for(int device) {
  auto it = g_handles.find(device);
  if (it != g_handles.end()) return it->second;
  cublasLtHandle_t h = nullptr;
  check(cublasLtCreate(&h), "cublasLtCreate");
  g_handles[device] = h;
  return h;
}

void set_scales(Plan* plan, const float* sa, const float* sb) {
  // cuBLASLt's A is the weight (its 128x128 scales), B the activations (their 1x128 scales)
  check(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sb, sizeof(sb)),
        "set A_SCALE_POINTER");
  check(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sa, sizeof(sa)),
        "set B_SCALE_POINTER");
}

// The heuristic rejects block-scaled descriptors without scale pointers (CUBLAS_STATUS_INVALID_VALUE): the
// first call's are set before it; every call sets its own before its matmul.
Plan* plan_for(cublasLtHandle_t handle, const Key& key, const float* sa, const float* sb) {
  auto it = g_plans.find(key);
  if (it != g_plans.end()) return it->second.get();
  if (g_plans.size() >= kMaxPlans) g_plans.clear();
  const auto [device, N, K, rows, lda, ldw, ldo, ws_bytes] = key;
  (void)device;
  auto plan = std::make_unique<Plan>();
  check(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "set TRANSA");
  check(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "set TRANSB");
  const cublasLtMatmulMatrixScale_t sa_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
  const cublasLtMatmulMatrixScale_t sb_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  check(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &sa_mode, sizeof(sa_mode)),
        "set A_SCALE_MODE (needs cuBLASLt >= 12.9)");
  check(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &sb_mode, sizeof(sb_mode)),
        "set B_SCALE_MODE");
  set_scales(plan.get(), sa, sb);
  check(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_8F_E4M3, K, N, ldw), "layout A");
  check(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_8F_E4M3, K, rows, lda), "layout B");
  check(cublasLtMatrixLayoutCreate(&plan->d, CUDA_R_16BF, N, rows, ldo), "layout D");

  cublasLtMatmulPreference_t pref = nullptr;
  check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
  const uint64_t ws = uint64_t(ws_bytes);
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                           sizeof(ws));
  if (st == CUBLAS_STATUS_SUCCESS) {
    st = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, plan->d, plan->d, pref, 1, &result,
                                        &found);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  check(st, "cublasLtMatmulAlgoGetHeuristic");
  if (found == 0) {
    throw std::runtime_error("turbo_dist._cublaslt: cuBLASLt has no blockwise FP8 algorithm for N=" +
                             std::to_string(N) + " K=" + std::to_string(K) + " rows=" + std::to_string(rows));
  }
  plan->algo = result.algo;
  Plan* raw = plan.get();
  g_plans.emplace(key, std::move(plan));
  return raw;
}

// out[rows of g] = dequant(a[rows of g]) @ dequant(b[g]) for every group g with rows[g] > 0, in order on
// `stream`; a has M rows, b G groups. Addresses: a (e4m3, row stride lda), b (e4m3, group g at
// b + g * b_group_stride bytes, [N, K]
// row-major with row stride ldw), out (bf16, row stride ldo), scale_a (fp32, grouped M-major: group g's
// [ceil(K/128)][rows[g]] block starts at element ceil(K/128) * (first row of g)), scale_b (fp32, group g's
// [ceil(N/128)][ld4] block at element g * sb_group_stride), workspace (ws_bytes).
void grouped_blockwise(int device, uintptr_t stream, uintptr_t a, uintptr_t b, uintptr_t out, uintptr_t scale_a,
                       uintptr_t scale_b, uintptr_t workspace, int64_t ws_bytes, const std::vector<int64_t>& rows,
                       int64_t M, int64_t G, int64_t N, int64_t K, int64_t lda, int64_t ldw, int64_t ldo,
                       int64_t b_group_stride, int64_t sb_group_stride) {
  int64_t total = 0;
  for (int64_t m : rows) {
    if (m < 0) throw std::runtime_error("turbo_dist._cublaslt: negative group length");
    total += m;
  }
  if (int64_t(rows.size()) > G || total > M) {
    throw std::runtime_error("turbo_dist._cublaslt: " + std::to_string(rows.size()) + " groups of " +
                             std::to_string(total) + " rows for b with " + std::to_string(G) + " groups and a with " +
                             std::to_string(M) + " rows");
  }
  std::lock_guard<std::mutex> lock(g_mutex);  // plans' descriptors are updated per call
  cublasLtHandle_t handle = handle_for(device);
  const int64_t kb = (K + 127) / 128;
  const float alpha = 1.0f, beta = 0.0f;
  int64_t first = 0;
  for (size_t g = 0; g < rows.size(); ++g) {
    const int64_t m = rows[g];
    if (m == 0) continue;
    const float* sa = reinterpret_cast<const float*>(scale_a) + kb * first;
    const float* sb = reinterpret_cast<const float*>(scale_b) + int64_t(g) * sb_group_stride;
    Plan* plan = plan_for(handle, Key(device, N, K, m, lda, ldw, ldo, ws_bytes), sa, sb);
    set_scales(plan, sa, sb);
    const auto* w = reinterpret_cast<const uint8_t*>(b) + int64_t(g) * b_group_stride;
    const auto* x = reinterpret_cast<const uint8_t*>(a) + first * lda;
    auto* d = reinterpret_cast<uint16_t*>(out) + first * ldo;
    check(cublasLtMatmul(handle, plan->desc, &alpha, w, plan->a, x, plan->b, &beta, d, plan->d, d, plan->d,
                         &plan->algo, reinterpret_cast<void*>(workspace), size_t(ws_bytes),
                         reinterpret_cast<cudaStream_t>(stream)),
          "cublasLtMatmul");
    first += m;
  }
}

size_t num_plans() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_plans.size();
}

int version() { return int(cublasLtGetVersion()); }

}  // namespace

PYBIND11_MODULE(_cublaslt, m) {
  m.doc() = "turbo_dist._cublaslt: FP8 blockwise grouped GEMM on cuBLASLt (backend 'cublaslt', "
            "turbo_dist/ops/fp8_grouped.py)";
  m.def("grouped_blockwise", &grouped_blockwise, py::arg("device"), py::arg("stream"), py::arg("a"), py::arg("b"),
        py::arg("out"), py::arg("scale_a"), py::arg("scale_b"), py::arg("workspace"), py::arg("ws_bytes"),
        py::arg("rows"), py::arg("M"), py::arg("G"), py::arg("N"), py::arg("K"), py::arg("lda"), py::arg("ldw"),
        py::arg("ldo"),
        py::arg("b_group_stride"), py::arg("sb_group_stride"));
  m.def("num_plans", &num_plans, "cached plans (descriptors + algorithm per distinct problem)");
  m.def("version", &version, "cublasLtGetVersion() of the library loaded");
}
