"""`TURBO_DIST_*` environment variables, read in one place (documented in README's table)."""
import os

SAFETY_ENV = {
    # NVLink multicast can take a host's shared GPUs down: keep it off everywhere we launch.
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def apply_safety_env(env=None):
    """Set the NVLink-multicast safety variables in `env` (default: os.environ) unless already set to a value."""
    env = os.environ if env is None else env
    for key, value in SAFETY_ENV.items():
        env.setdefault(key, value)
    return env


def env_int(name, default):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def env_float(name, default):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def env_str(name, default=None):
    raw = os.environ.get(name)
    return default if raw is None or raw == "" else raw


def max_symm_bytes():
    """Cap on one symmetric buffer, TURBO_DIST_MAX_SYMM_BYTES (default 16 GiB)."""
    return env_int("TURBO_DIST_MAX_SYMM_BYTES", 16 << 30)


def peer_timeout_s():
    """How long a kernel or host wait on a peer may spin before raising, TURBO_DIST_TIMEOUT_S (default 100 s)."""
    return env_float("TURBO_DIST_TIMEOUT_S", 100.0)
