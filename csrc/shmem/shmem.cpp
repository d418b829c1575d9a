// turbo_dist._shmem: a pybind11 binding of the SHMEM host API (NVSHMEM or rocSHMEM, see shmem_api.h).
//
// Built without torch headers: symmetric addresses travel as Python ints, and `as_dlpack` wraps
// an address range in a DLPack capsule that torch.from_dlpack turns into a tensor on a chosen
// device (peer addresses map another GPU's memory into ours, so the device cannot be inferred
// from the pointer). Blocking collectives release the GIL. Errors raise RuntimeError.
#include <Python.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "shmem_api.h"

namespace py = pybind11;

namespace {

bool g_initialized = false;

std::string status_text(int status) {
  return std::string(tdshmem::status_name(status)) + " (status " + std::to_string(status) + ")";
}

void require_init(const char* what) {
  if (!g_initialized) {
    throw std::runtime_error(std::string("turbo_dist._shmem.") + what + ": SHMEM is not initialised; call " +
                             "turbo_dist.shmem.init() first");
  }
}

// --- DLPack (legacy, v0.x ABI), declared here so no header is needed --------------------------
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

struct DLContext {
  int64_t shape[1];
  int64_t strides[1];
  PyObject* owner;  // keeps the Python allocation record alive while the tensor lives
};

void dl_deleter(DLManagedTensor* self) {
  auto* ctx = static_cast<DLContext*>(self->manager_ctx);
  // torch may free the tensor from a thread that does not hold the GIL.
  if (ctx->owner != nullptr && Py_IsInitialized()) {
    PyGILState_STATE state = PyGILState_Ensure();
    Py_DECREF(ctx->owner);
    PyGILState_Release(state);
  }
  delete ctx;
  delete self;
}

void dl_capsule_destructor(PyObject* capsule) {
  // A consumed capsule is renamed "used_dltensor" and its tensor owns the deleter.
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
  } else {
    PyErr_Clear();
  }
}

py::object as_dlpack(uintptr_t addr, int64_t nbytes, int device_index, py::object owner) {
  if (addr == 0) throw std::invalid_argument("as_dlpack: null address");
  if (nbytes < 0) throw std::invalid_argument("as_dlpack: negative size");
  auto* ctx = new DLContext{{nbytes}, {1}, owner.ptr()};
  Py_XINCREF(ctx->owner);
  auto* managed = new DLManagedTensor{};
  managed->dl_tensor.data = reinterpret_cast<void*>(addr);
  managed->dl_tensor.device = DLDevice{tdshmem::kDLDeviceType, device_index};
  managed->dl_tensor.ndim = 1;
  managed->dl_tensor.dtype = DLDataType{1, 8, 1};  // kDLUInt, 8 bits
  managed->dl_tensor.shape = ctx->shape;
  managed->dl_tensor.strides = ctx->strides;
  managed->dl_tensor.byte_offset = 0;
  managed->manager_ctx = ctx;
  managed->deleter = dl_deleter;
  PyObject* capsule = PyCapsule_New(managed, "dltensor", dl_capsule_destructor);
  if (capsule == nullptr) {
    dl_deleter(managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(capsule);
}

// --- SHMEM ---------------------------------------------------------------------------------

py::bytes get_unique_id() {
  tdshmem::uniqueid_t uid;
  std::memset(static_cast<void*>(&uid), 0, sizeof(uid));
  int status;
  {
    py::gil_scoped_release release;
    status = tdshmem::get_uniqueid(&uid);
  }
  if (status != 0) {
    throw std::runtime_error(std::string(tdshmem::kBackend) + " get_uniqueid failed: " + status_text(status));
  }
  return py::bytes(reinterpret_cast<const char*>(&uid), sizeof(uid));
}

void init(py::bytes uid_bytes, int rank, int nranks) {
  if (g_initialized) throw std::runtime_error("turbo_dist._shmem.init: already initialised");
  if (tdshmem::is_initialized()) {  // one library instance per process: e.g. torch's NVSHMEM backend got there first
    throw std::runtime_error(std::string(tdshmem::kBackend) +
                             " is already initialised in this process by another component (torch's NVSHMEM "
                             "symmetric-memory backend?); turbo_dist cannot share it");
  }
  std::string raw = uid_bytes;
  if (raw.size() != tdshmem::kUniqueIdBytes) {
    throw std::invalid_argument("init: the unique id must be " + std::to_string(tdshmem::kUniqueIdBytes) +
                                " bytes, got " + std::to_string(raw.size()));
  }
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    throw std::invalid_argument("init: rank " + std::to_string(rank) + " outside [0, " + std::to_string(nranks) +
                                ")");
  }
  tdshmem::uniqueid_t uid;
  std::memcpy(static_cast<void*>(&uid), raw.data(), sizeof(uid));
  int status;
  {
    py::gil_scoped_release release;
    status = tdshmem::init_with_uniqueid(&uid, rank, nranks);
  }
  if (status != 0) {
    throw std::runtime_error(std::string(tdshmem::kBackend) + " initialisation failed: " + status_text(status));
  }
  g_initialized = true;
}

void finalize() {
  if (!g_initialized) return;
  {
    py::gil_scoped_release release;
    tdshmem::finalize();
  }
  g_initialized = false;
}

uintptr_t shmem_malloc(size_t nbytes) {
  require_init("malloc");
  void* p;
  {
    py::gil_scoped_release release;
    p = tdshmem::malloc(nbytes);
  }
  if (p == nullptr && nbytes > 0) {
    throw std::runtime_error(std::string(tdshmem::kBackend) + " malloc of " + std::to_string(nbytes) +
                             " bytes failed (symmetric heap exhausted? raise NVSHMEM_SYMMETRIC_SIZE)");
  }
  return reinterpret_cast<uintptr_t>(p);
}

void shmem_free(uintptr_t addr) {
  require_init("free");
  py::gil_scoped_release release;
  tdshmem::free(reinterpret_cast<void*>(addr));
}

uintptr_t shmem_ptr(uintptr_t addr, int pe) {
  require_init("ptr");
  if (pe < 0 || pe >= tdshmem::n_pes()) {
    throw std::invalid_argument("ptr: pe " + std::to_string(pe) + " outside [0, " +
                                std::to_string(tdshmem::n_pes()) + ")");
  }
  return reinterpret_cast<uintptr_t>(tdshmem::ptr(reinterpret_cast<void*>(addr), pe));
}

int64_t team_split_strided(int64_t parent, int start, int stride, int size) {
  require_init("team_split_strided");
  tdshmem::team_t out = tdshmem::team_invalid();
  int status;
  {
    py::gil_scoped_release release;
    status = tdshmem::team_split_strided(tdshmem::team_from_int(parent), start, stride, size, &out);
  }
  if (status != 0) {
    throw std::runtime_error(std::string(tdshmem::kBackend) + " team_split_strided(start=" + std::to_string(start) +
                             ", stride=" + std::to_string(stride) + ", size=" + std::to_string(size) +
                             ") failed: " + status_text(status));
  }
  return tdshmem::team_to_int(out);
}

}  // namespace

PYBIND11_MODULE(_shmem, m) {
  m.doc() = "Host-side SHMEM binding (NVSHMEM or rocSHMEM); use turbo_dist.shmem, not this module";
  m.attr("BACKEND") = tdshmem::kBackend;
  m.attr("UNIQUE_ID_BYTES") = py::int_(tdshmem::kUniqueIdBytes);
  // Functions, not constants: rocSHMEM's world team is a variable that init() fills in.
  m.def("team_world", []() { return tdshmem::team_to_int(tdshmem::team_world()); });
  m.def("team_shared", []() { return tdshmem::team_to_int(tdshmem::team_shared()); });
  m.def("team_invalid", []() { return tdshmem::team_to_int(tdshmem::team_invalid()); });

  m.def("version", []() {
    int major = 0, minor = 0, patch = 0;
    tdshmem::version(&major, &minor, &patch);
    return py::make_tuple(major, minor, patch);
  });
  m.def("get_unique_id", &get_unique_id, "A new unique id (bytes) for init(); call on one rank only");
  m.def("init", &init, py::arg("unique_id"), py::arg("rank"), py::arg("nranks"),
        "Collective: initialise with the unique id every rank received");
  m.def("is_initialized", []() { return g_initialized; });
  m.def("finalize", &finalize, "Collective: tear SHMEM down (frees the symmetric heap)");
  m.def("my_pe", []() {
    require_init("my_pe");
    return tdshmem::my_pe();
  });
  m.def("n_pes", []() {
    require_init("n_pes");
    return tdshmem::n_pes();
  });
  m.def("malloc", &shmem_malloc, py::arg("nbytes"), "Collective: symmetric allocation; returns its address");
  m.def("free", &shmem_free, py::arg("addr"), "Collective: free a symmetric allocation");
  m.def("ptr", &shmem_ptr, py::arg("addr"), py::arg("pe"),
        "Address through which this GPU loads/stores `pe`'s copy of symmetric `addr`; 0 if not reachable");
  m.def("barrier_all", []() {
    require_init("barrier_all");
    py::gil_scoped_release release;
    tdshmem::barrier_all();
  });
  m.def("barrier_all_on_stream", [](uintptr_t stream) {
    require_init("barrier_all_on_stream");
    py::gil_scoped_release release;
    tdshmem::barrier_all_on_stream(reinterpret_cast<void*>(stream));
  }, py::arg("stream"));
  m.def("quiet", []() {
    require_init("quiet");
    py::gil_scoped_release release;
    tdshmem::quiet();
  });
  m.def("quiet_on_stream", [](uintptr_t stream) {
    require_init("quiet_on_stream");
    py::gil_scoped_release release;
    tdshmem::quiet_on_stream(reinterpret_cast<void*>(stream));
  }, py::arg("stream"));
  m.def("fence", []() {
    require_init("fence");
    tdshmem::fence();
  });
  m.def("team_my_pe", [](int64_t team) {
    require_init("team_my_pe");
    return tdshmem::team_my_pe(tdshmem::team_from_int(team));
  }, py::arg("team"));
  m.def("team_n_pes", [](int64_t team) {
    require_init("team_n_pes");
    return tdshmem::team_n_pes(tdshmem::team_from_int(team));
  }, py::arg("team"));
  m.def("team_translate_pe", [](int64_t src, int pe, int64_t dst) {
    require_init("team_translate_pe");
    return tdshmem::team_translate_pe(tdshmem::team_from_int(src), pe, tdshmem::team_from_int(dst));
  }, py::arg("src_team"), py::arg("pe"), py::arg("dest_team"));
  m.def("team_split_strided", &team_split_strided, py::arg("parent"), py::arg("start"), py::arg("stride"),
        py::arg("size"), "Collective over `parent`: the new team, or team_invalid() where this PE is not in it");
  m.def("team_destroy", [](int64_t team) {
    require_init("team_destroy");
    py::gil_scoped_release release;
    tdshmem::team_destroy(tdshmem::team_from_int(team));
  }, py::arg("team"));
  m.def("as_dlpack", &as_dlpack, py::arg("addr"), py::arg("nbytes"), py::arg("device_index"), py::arg("owner"),
        "A DLPack capsule of `nbytes` uint8 at `addr` on GPU `device_index`, keeping `owner` alive");
}
