"""`TURBO_DIST_*` environment variables, read in one place (documented in README's table)."""
import logging
import os

SAFETY_ENV = {
    # NVLink multicast can take a host's shared GPUs down: keep it off everywhere we launch.
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def apply_safety_env(env=None):
    """Force the NVLink-multicast safety variables in `env` (default: os.environ): an inherited other value
    (NCCL_NVLS_ENABLE=1, an empty string, which NCCL reads as unset) is replaced, with a warning, never kept."""
    env = os.environ if env is None else env
    for key, value in SAFETY_ENV.items():
        old = env.get(key)
        if old is not None and old != value:
            logging.getLogger("turbo_dist").warning(
                "%s=%r overridden to %r: NVLink multicast stays off (it can take a shared host's GPUs down)", key,
                old, value)
        env[key] = value
    return env


_ENV_KEYS = {}


def getenv(name, default=None):
    """`os.environ.get(name, default)` at a tenth of its cost, for what every op call reads (a backend
    override, TRITON_INTERPRET): CPython's os.environ encodes the key and decodes the value on each get
    (~1.5 us). This reads the dict os.environ keeps itself in sync with (every set, del and
    monkeypatch.setenv goes through it), with the key encoded once; any other mapping falls back to get."""
    env = os.environ
    data = getattr(env, "_data", None)
    encode = getattr(env, "encodekey", None)
    if data is None or encode is None:
        return env.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = encode(name)
    raw = data.get(key)
    return default if raw is None else env.decodevalue(raw)


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
    raw = getenv(name)
    return default if raw is None or raw == "" else raw


def max_symm_bytes():
    """Cap on one symmetric buffer, TURBO_DIST_MAX_SYMM_BYTES (default 16 GiB)."""
    return env_int("TURBO_DIST_MAX_SYMM_BYTES", 16 << 30)


def peer_timeout_s():
    """How long a kernel or host wait on a peer may spin before raising, TURBO_DIST_TIMEOUT_S (default 100 s)."""
    value = env_float("TURBO_DIST_TIMEOUT_S", 100.0)
    if not 0.0 < value < float("inf"):  # also rejects NaN: a wait must end, and not at once
        raise ValueError(f"TURBO_DIST_TIMEOUT_S={value!r}: expected a positive, finite number of seconds")
    return value


# Test mode: ranks over gloo sharing GPUs (turbo_dist.testing.run_distributed sets these in each rank).
SHARE_GPU_VAR = "TURBO_DIST_TEST_SHARE_GPU"
SHARE_GPU_RANK_ENV = {
    SHARE_GPU_VAR: "1",
    # torch symmetric memory refuses two ranks on one device unless told this is a test.
    "TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES": "1",
}


def share_gpu_mode():
    """TURBO_DIST_TEST_SHARE_GPU=1 (default 0): test mode where ranks share GPUs over a gloo group.

    The runtime then treats a gloo group as a CUDA group on the rank's current device, with torch
    symmetric memory (CUDA IPC) for peer access; turbo_dist.testing.run_distributed launches ranks
    that way when there are fewer GPUs than ranks. Never set in production.
    """
    value = env_int(SHARE_GPU_VAR, 0)
    if value not in (0, 1):
        raise ValueError(f"{SHARE_GPU_VAR}={value}: expected 0 or 1")
    return value == 1
