"""Install turbo_dist; build the optional native SHMEM module only when its toolchain is found.

`pip install -e .` must always work: on a CPU-only machine, on a CUDA machine without
NVSHMEM, and on one with it. The native module (`turbo_dist._shmem`, csrc/shmem/) is built
only when its sources exist and NVSHMEM (CUDA) or rocSHMEM (ROCm) headers and libraries are
found; any failure to build it is reported and skipped, never fatal.
"""
import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


def _find_nvshmem():
    """Return (include_dir, lib_dir) of NVSHMEM or None: NVSHMEM_HOME, then the pip wheel."""
    candidates = []
    if os.environ.get("NVSHMEM_HOME"):
        candidates.append(os.environ["NVSHMEM_HOME"])
    try:
        import nvidia.nvshmem as _nv  # the nvidia-nvshmem-cu1x wheel

        candidates.extend(list(getattr(_nv, "__path__", [])))
    except Exception:
        pass
    for home in candidates:
        inc, lib = os.path.join(home, "include"), os.path.join(home, "lib")
        if os.path.exists(os.path.join(inc, "nvshmem.h")) and glob.glob(os.path.join(lib, "libnvshmem_host.so*")):
            return inc, lib
    return None


def _find_cuda_home():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _native_extensions():
    if os.environ.get("TURBO_DIST_SKIP_NATIVE", "0") == "1":
        return []
    sources = sorted(glob.glob(os.path.join("csrc", "shmem", "*.cpp")))
    if not sources:
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("turbo_dist: pybind11 not found, skipping the native SHMEM module", file=sys.stderr)
        return []
    nvshmem, cuda_home = _find_nvshmem(), _find_cuda_home()
    if nvshmem is not None and cuda_home is None:
        # No toolkit: the CUDA headers of torch's pip wheels (nvidia/cu13/include, nvidia/cuda_runtime/include).
        try:
            import nvidia

            for root in getattr(nvidia, "__path__", []):
                for inc_dir in glob.glob(os.path.join(root, "*", "include")):
                    if all(os.path.exists(os.path.join(inc_dir, h)) for h in ("cuda.h", "cuda_runtime.h")):
                        cuda_home = os.path.dirname(inc_dir)
                        break
                if cuda_home is not None:
                    break
        except Exception:
            pass
    if nvshmem is not None and cuda_home is not None:
        inc, lib = nvshmem
        # Only the NVSHMEM host library is linked (its host API loads the CUDA driver itself, so no
        # cudart/-lcuda). The pip wheel ships only libnvshmem_host.so.3 (no unversioned link), so
        # link the file by path; the rpath lets the module find it (and its plugins) at run time.
        libs = sorted(glob.glob(os.path.join(lib, "libnvshmem_host.so*")), key=len)
        cuda_inc = [os.path.join(cuda_home, "include")]
        if os.path.isdir(os.path.join(cuda_home, "include", "cccl")):  # CUDA 13 keeps <cuda/std/...> here
            cuda_inc.append(os.path.join(cuda_home, "include", "cccl"))
        return [
            Pybind11Extension(
                "turbo_dist._shmem",
                sources,
                include_dirs=[inc] + cuda_inc + ["csrc/shmem"],
                extra_link_args=[libs[0]],
                runtime_library_dirs=[lib],
                define_macros=[("TURBO_DIST_NVSHMEM", "1")],
                cxx_std=17,
            )
        ]
    rocshmem = os.environ.get("ROCSHMEM_HOME")
    rocm = os.environ.get("ROCM_PATH", "/opt/rocm")
    if rocshmem and os.path.exists(os.path.join(rocshmem, "include")):
        return [
            Pybind11Extension(
                "turbo_dist._shmem",
                sources,
                # Untested: rocSHMEM's header needs HIP's and MPI's headers (ROCM_PATH, MPI_HOME).
                include_dirs=[os.path.join(rocshmem, "include"), os.path.join(rocm, "include"), "csrc/shmem"]
                + ([os.path.join(os.environ["MPI_HOME"], "include")] if os.environ.get("MPI_HOME") else []),
                library_dirs=[os.path.join(rocshmem, "lib"), os.path.join(rocm, "lib")],
                libraries=["rocshmem", "amdhip64"],
                runtime_library_dirs=[os.path.join(rocshmem, "lib")],
                define_macros=[("TURBO_DIST_ROCSHMEM", "1"), ("__HIP_PLATFORM_AMD__", "1")],
                cxx_std=17,
            )
        ]
    print("turbo_dist: NVSHMEM/rocSHMEM not found, skipping the native SHMEM module", file=sys.stderr)
    return []


class OptionalBuildExt(build_ext):
    """Build native extensions, but never fail the install because one could not be built."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # toolchain missing or broken
            print(f"turbo_dist: native module not built ({exc}); pure-Python paths remain", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"turbo_dist: could not build {ext.name} ({exc}); skipping it", file=sys.stderr)


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
    },
    ext_modules=_native_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
