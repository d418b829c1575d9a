"""Install turbo_dist; build the optional native modules only where their toolchains are found.

`pip install -e .` must always work: on a CPU-only machine, on a CUDA machine without NVSHMEM, and on one
with it. The native modules -- `turbo_dist._shmem` (csrc/shmem/: NVSHMEM or rocSHMEM headers and libraries),
`turbo_dist._cublaslt` (csrc/cublaslt/: cuBLASLt >= 12.9) and `turbo_dist._fp8_wgmma` (csrc/fp8_wgmma/: nvcc
and a CUDA build of torch) -- are each built only when their sources and toolchain are found; a failure to build
one is reported (`python -m pip install -v` shows it) and skipped, never fatal, and never stops the others.
"""
import glob
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


def _site_dirs():
    """site-packages of this interpreter, also when pip's build isolation hides them from sys.path."""
    import sysconfig

    dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path and path not in dirs:
            dirs.append(path)
    return dirs


def _find_nvshmem():
    """Return (include_dir, lib_dir) of NVSHMEM or None: NVSHMEM_HOME, then the nvidia-nvshmem-cu1x wheel."""
    candidates = []
    if os.environ.get("NVSHMEM_HOME"):
        candidates.append(os.environ["NVSHMEM_HOME"])
    try:
        import nvidia.nvshmem as _nv

        candidates.extend(list(getattr(_nv, "__path__", [])))
    except Exception:
        pass
    candidates.extend(os.path.join(d, "nvidia", "nvshmem") for d in _site_dirs())
    for home in candidates:
        inc = os.path.join(home, "include")
        for lib in (os.path.join(home, "lib"), os.path.join(home, "lib64")):
            if os.path.exists(os.path.join(inc, "nvshmem_host.h")) and glob.glob(
                    os.path.join(lib, "libnvshmem_host.so*")):
                return inc, lib
    return None


def _cuda_homes(wheels_first=False):
    """Where CUDA's headers and libraries may live: CUDA_HOME / CUDA_PATH / /usr/local/cuda, and the nvidia/*
    directories of the CUDA pip wheels torch depends on (nvidia/cu13 for CUDA 13; nvidia/cublas,
    nvidia/cuda_runtime, ... for CUDA 12), in that order or the wheels first."""
    toolkit = [h for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if h]
    wheels = []
    for site in _site_dirs():
        wheels.extend(sorted(glob.glob(os.path.join(site, "nvidia", "*"))))
    return wheels + toolkit if wheels_first else toolkit + wheels


def _find_cuda_include():
    """Directory holding cuda_runtime.h: CUDA_HOME/CUDA_PATH, /usr/local/cuda, then torch's CUDA pip wheels."""
    dirs = [os.path.join(h, "include") for h in _cuda_homes()]
    for inc in dirs:
        if all(os.path.exists(os.path.join(inc, h)) for h in ("cuda.h", "cuda_runtime.h")):
            return inc
    return None


def _pybind11_include():
    """pybind11's headers: the pybind11 package, else the copy PyTorch ships (torch/include/pybind11)."""
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        pass
    for site in _site_dirs():
        inc = os.path.join(site, "torch", "include")
        if os.path.exists(os.path.join(inc, "pybind11", "pybind11.h")):
            return inc
    return None


def _native_extensions():
    """turbo_dist._shmem when NVSHMEM (or rocSHMEM) is found, turbo_dist._cublaslt when cuBLASLt is; [] for
    what is missing. Never raises."""
    if os.environ.get("TURBO_DIST_SKIP_NATIVE", "0") == "1":
        return []
    found = []
    for detect in (_detect_native_extensions, _detect_cublaslt_extension, _detect_wgmma_extension):
        try:
            found += detect()
        except Exception as exc:  # a broken toolchain layout must not break the install
            print(f"turbo_dist: native module detection failed ({exc!r}), skipping it", file=sys.stderr)
    return found


def _find_cublaslt():
    """(include dirs, library file) for cuBLASLt >= 12.9 (blockwise FP8 scaling) or None. The library: the
    one torch loads (the nvidia-cublas wheel), else CUDA_HOME's; the headers: the first directory that has
    cublasLt.h with the CUDA runtime and CCCL headers it includes."""
    homes = _cuda_homes(wheels_first=True)
    lib = None
    for home in homes:
        libs = sorted(glob.glob(os.path.join(home, "lib*", "libcublasLt.so*")), key=len)
        if libs:
            lib = libs[0] if not libs[0].endswith(".so") or len(libs) == 1 else libs[1]
            break
    incs = []
    for home in homes:
        inc = os.path.join(home, "include")
        if os.path.exists(os.path.join(inc, "cublasLt.h")):
            incs.append(inc)
    for inc in [os.path.join(h, "include") for h in homes]:  # runtime / crt / cccl headers, wherever they are
        if os.path.exists(os.path.join(inc, "crt", "host_defines.h")) and inc not in incs:
            incs.append(inc)
        for sub in (inc, os.path.join(inc, "cccl")):
            if os.path.exists(os.path.join(sub, "nv", "target")) and sub not in incs:
                incs.append(sub)
    have = lambda rel: any(os.path.exists(os.path.join(i, rel)) for i in incs)  # noqa: E731
    needed = ("cublasLt.h", "cuda_runtime_api.h", os.path.join("crt", "host_defines.h"), os.path.join("nv", "target"))
    if lib is None or not all(have(h) for h in needed):
        return None
    with open(next(os.path.join(i, "cublasLt.h") for i in incs if os.path.exists(os.path.join(i, "cublasLt.h")))) as f:
        if "CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F" not in f.read():
            print("turbo_dist: cuBLASLt < 12.9 (no blockwise FP8 scaling), skipping turbo_dist._cublaslt",
                  file=sys.stderr)
            return None
    return incs, lib


def _detect_cublaslt_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "cublaslt", "*.cpp")))
    pybind_inc = _pybind11_include()
    found = _find_cublaslt() if sources and pybind_inc else None
    if found is None:
        print("turbo_dist: cuBLASLt headers/library (or pybind11) not found, skipping turbo_dist._cublaslt "
              "(the FP8 blockwise grouped GEMM backend 'cublaslt')", file=sys.stderr)
        return []

    incs, lib = found
    return [Extension("turbo_dist._cublaslt", sources, include_dirs=[pybind_inc] + incs, extra_link_args=[lib],
                      runtime_library_dirs=[os.path.dirname(lib)], language="c++",
                      extra_compile_args=["-std=c++17", "-fvisibility=hidden", "-g0", "-O2"])]


def _find_nvcc():
    """nvcc: CUDA_HOME/CUDA_PATH's, /usr/local/cuda's, else the one on PATH; None when there is none."""
    import shutil

    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _torch_is_cpu_build():
    """True when the torch installed here is a CPU build (its version.py says cuda = None), without importing
    torch (pip's build isolation may hide it from this interpreter, not from its site-packages)."""
    import re

    for site in _site_dirs():
        path = os.path.join(site, "torch", "version.py")
        if os.path.exists(path):
            with open(path) as f:
                return re.search(r"^cuda(: [^=]+)? = None", f.read(), re.M) is not None
    return False


class NvccExtension(Extension):
    """A module compiled and linked by nvcc in one step (OptionalBuildExt.build_extension): CUDA kernels with
    their pybind11 binding, the CUDA runtime linked statically."""

    def __init__(self, name, sources, nvcc, include_dirs, flags):
        super().__init__(name, sources, include_dirs=include_dirs, extra_compile_args=list(flags), language="c++")
        self.nvcc = nvcc

    def command(self, target):
        incs = [f"-I{d}" for d in self.include_dirs]
        return [self.nvcc, *self.extra_compile_args, *incs, *self.sources, "-o", target]


# nvcc flags of turbo_dist._fp8_wgmma: Hopper only (sm_90a: WGMMA, TMA, setmaxnreg), one shared object
WGMMA_NVCC_FLAGS = ["-O3", "-std=c++17", "-gencode", "arch=compute_90a,code=sm_90a", "--shared", "-Xcompiler",
                    "-fPIC,-fvisibility=hidden", "-Xcudafe", "--diag_suppress=177"]


def _detect_wgmma_extension():
    """turbo_dist._fp8_wgmma (csrc/fp8_wgmma/: the FP8 blockwise grouped GEMM for Hopper) where nvcc and
    pybind11 are found and torch is a CUDA build (TURBO_DIST_BUILD_WGMMA=1 builds it anyway, =0 never)."""
    sources = sorted(glob.glob(os.path.join("csrc", "fp8_wgmma", "*.cu")))
    want = os.environ.get("TURBO_DIST_BUILD_WGMMA")
    if not sources or want == "0":
        return []
    if want != "1" and _torch_is_cpu_build():
        print("turbo_dist: torch is a CPU build, skipping turbo_dist._fp8_wgmma (the Hopper FP8 grouped GEMM; "
              "TURBO_DIST_BUILD_WGMMA=1 builds it anyway)", file=sys.stderr)
        return []
    nvcc, pybind_inc = _find_nvcc(), _pybind11_include()
    if nvcc is None or pybind_inc is None:
        print("turbo_dist: nvcc (or pybind11) not found, skipping turbo_dist._fp8_wgmma (the FP8 blockwise "
              "grouped GEMM backend 'wgmma')", file=sys.stderr)
        return []
    import sysconfig

    return [NvccExtension("turbo_dist._fp8_wgmma", sources, nvcc, [pybind_inc, sysconfig.get_paths()["include"]],
                          WGMMA_NVCC_FLAGS)]


def _detect_native_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "shmem", "*.cpp")))
    if not sources:
        return []

    pybind_inc = _pybind11_include()
    if pybind_inc is None:
        print("turbo_dist: pybind11 headers not found, skipping the native SHMEM module", file=sys.stderr)
        return []
    # What Pybind11Extension would add: hidden symbols, C++17, no debug info (smaller, faster to build).
    common = dict(language="c++", extra_compile_args=["-std=c++17", "-fvisibility=hidden", "-g0", "-O2"])
    nvshmem, cuda_inc = _find_nvshmem(), _find_cuda_include()
    if nvshmem is not None and cuda_inc is not None:
        inc, lib = nvshmem
        # Only the NVSHMEM host library is linked (its host API loads the CUDA driver itself, so no
        # cudart/-lcuda). The pip wheel ships only libnvshmem_host.so.3 (no unversioned link), so
        # link the file by path; the rpath lets the module find it (and its plugins) at run time.
        libs = sorted(glob.glob(os.path.join(lib, "libnvshmem_host.so*")), key=len)
        cuda_incs = [cuda_inc] + ([os.path.join(cuda_inc, "cccl")] if os.path.isdir(os.path.join(cuda_inc, "cccl"))
                                  else [])  # CUDA 13 keeps <cuda/std/...> under include/cccl
        return [
            Extension(
                "turbo_dist._shmem",
                sources,
                include_dirs=[pybind_inc, inc] + cuda_incs + ["csrc/shmem"],
                extra_link_args=[libs[0]],
                runtime_library_dirs=[lib],
                define_macros=[("TURBO_DIST_NVSHMEM", "1")],
                **common,
            )
        ]
    rocshmem = os.environ.get("ROCSHMEM_HOME")
    rocm = os.environ.get("ROCM_PATH", "/opt/rocm")
    if rocshmem and os.path.exists(os.path.join(rocshmem, "include")):
        return [
            Extension(
                "turbo_dist._shmem",
                sources,
                # Untested: rocSHMEM's header needs HIP's and MPI's headers (ROCM_PATH, MPI_HOME).
                include_dirs=[pybind_inc, os.path.join(rocshmem, "include"), os.path.join(rocm, "include"),
                              "csrc/shmem"]
                + ([os.path.join(os.environ["MPI_HOME"], "include")] if os.environ.get("MPI_HOME") else []),
                library_dirs=[os.path.join(rocshmem, "lib"), os.path.join(rocm, "lib")],
                libraries=["rocshmem", "amdhip64"],
                runtime_library_dirs=[os.path.join(rocshmem, "lib")],
                define_macros=[("TURBO_DIST_ROCSHMEM", "1"), ("__HIP_PLATFORM_AMD__", "1")],
                **common,
            )
        ]
    missing = "NVSHMEM" if nvshmem is None else "the CUDA headers (cuda_runtime.h; set CUDA_HOME)"
    print(f"turbo_dist: {missing} not found (nor ROCSHMEM_HOME), skipping the native SHMEM module",
          file=sys.stderr)
    return []


class OptionalBuildExt(build_ext):
    """Build native extensions, but never fail the install because one could not be built."""

    def run(self):
        # optional: an editable install copies each built module into turbo_dist/; one that failed to build must
        # not stop the copy of the others (setuptools raises on the first missing non-optional one)
        for ext in self.extensions:
            ext.optional = True
        try:
            super().run()
        except Exception as exc:  # toolchain missing or broken
            print(f"turbo_dist: native module not built ({exc}); pure-Python paths remain", file=sys.stderr)

    def build_extension(self, ext):
        import shutil
        import time

        start = time.perf_counter()
        cached = _native_cache_path(ext)
        try:
            target = self.get_ext_fullpath(ext.name)
            if cached is not None and os.path.exists(cached):  # same sources, flags and NVSHMEM: reuse it
                os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
                shutil.copyfile(cached, target)
                print(f"turbo_dist: reused {ext.name} from {cached}", file=sys.stderr)
                return
            if isinstance(ext, NvccExtension):
                import subprocess

                os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
                subprocess.run(ext.command(target), check=True)
            else:
                super().build_extension(ext)
        except Exception as exc:
            print(f"turbo_dist: could not build {ext.name} ({exc}); skipping it", file=sys.stderr)
            return
        print(f"turbo_dist: built {ext.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        if cached is not None:
            try:
                os.makedirs(os.path.dirname(cached), exist_ok=True)
                shutil.copyfile(target, cached + ".tmp")
                os.replace(cached + ".tmp", cached)
            except OSError:
                pass


def _native_cache_path(ext):
    """build/native-cache/<hash>/<module file>: the hash covers everything the build reads, or None."""
    import hashlib
    import sysconfig

    try:
        h = hashlib.sha256()
        h.update(repr((ext.name, ext.define_macros, ext.include_dirs, ext.extra_compile_args, ext.extra_link_args,
                       ext.runtime_library_dirs, sys.version, sysconfig.get_config_var("EXT_SUFFIX"))).encode())
        here = os.path.dirname(os.path.abspath(__file__))
        deps = list(ext.sources) + sorted(glob.glob(os.path.join(here, os.path.dirname(ext.sources[0]), "*.h")))
        for path in deps:
            with open(os.path.join(here, path) if not os.path.isabs(path) else path, "rb") as f:
                h.update(f.read())
        if isinstance(ext, NvccExtension):  # another toolkit (CUDA_HOME) must rebuild, not reuse
            import subprocess

            h.update(ext.nvcc.encode())
            version = subprocess.run([ext.nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
            h.update(version.encode())
        for lib in ext.extra_link_args:  # the linked library, by size and time (its headers travel with it)
            if os.path.exists(lib):
                st = os.stat(lib)
                h.update(f"{lib}:{st.st_size}:{st.st_mtime_ns}".encode())
        name = ext.name.split(".")[-1] + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
        return os.path.join(here, "build", "native-cache", h.hexdigest()[:20], name)
    except Exception:
        return None


setup(
    name="turbo_dist",
    version="0.1.0",
    description="Communication/computation overlap for distributed (MoE) training: "
    "MoE dispatch/combine, async tensor parallelism, context-parallel attention",
    packages=find_packages(include=["turbo_dist", "turbo_dist.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "pybind11"],
    extras_require={
        "mpi": ["mpi4py"],
        "test": ["pytest"],
        # framework integrations (turbo_dist.integrations.*), pinned to the versions they are tested against
        "megatron": ["megatron-core==0.16.1"],
        "torchtitan": ["torchtitan==0.3.0"],  # needs Python >= 3.11; pins spmd_types==0.2.3 itself
    },
    ext_modules=_native_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
