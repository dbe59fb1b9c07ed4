"""Compile the C kernels on first use and load them through ctypes.

Why C and not a torch extension: without torch headers the kernels compile in a few seconds
with the system C compiler (`$CC`, default gcc), so they can be built lazily on the serving machine (``-march=native``)
with no build step at install time. The shared object is cached under
``$LIGHTSERVE_HOME/kernels/`` (default ``~/.cache/lightserve/kernels/``); its file name holds a
hash of the sources, the compiler command, the compiler version and the CPU's feature flags, so
a changed kernel, compiler or machine never loads a stale build.

If the compiler is missing or the build fails, :func:`load` returns None (the reason is logged once and
kept in :func:`unavailable_reason`) and callers use their torch path instead.

Threads: the kernels run OpenMP with ``torch.get_num_threads()`` threads (fewer for small
calls). torch is imported before the library is loaded, so the library's ``libgomp.so.1``
resolves to the runtime torch already loaded and both share one thread pool instead of
competing.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch  # noqa: F401  (loaded first: the kernels then share torch's OpenMP runtime)

del torch  # imported for its side effect only

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_SOURCES = (_HERE / "token_attention.c", _HERE / "context_attention.c", _HERE / "layer_ops.c", _HERE / "token_mask.c",
            _HERE / "int8_ops.c")
_HEADERS = (_HERE / "rows.h",)  # included by the sources: part of the build's hash
_LIBRARY = "cpu_kernels"
_DEFAULT_COMPILER = "gcc"
# -ffp-contract=off: no FMA where the torch reference rounds a product before adding (layer_ops.c).
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
_COMPILE_TIMEOUT_S = 120

i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32, ctypes.c_float
# The C entry points and their argument types; every one returns an int status (0 = ok).
_SIGNATURES = {
    "token_decode_attention": [
        ptr, i64,  # q, q_stride_b
        ptr, i64,  # k_cache, k_stride_s
        ptr, i64,  # v_cache, v_stride_s
        ptr, ptr, i64,  # k_scale, v_scale (NULL unless the pool is int8), their row stride
        ptr, i64, i64, i64,  # req_to_token, its row stride, rows, columns (max positions)
        ptr, ptr, i64,  # b_req_idx, b_seq_len, batch
        i64, i64, i64, i64,  # pool slots, q heads, kv heads, head_dim
        i32, f32,  # is_bf16, scale
        ptr, i64,  # out, out_stride_b
        i32,  # threads
    ],
    "context_attention": [ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, f32, i32],
    "context_attention_supported": [],
    "rms_norm": [ptr, i64, ptr, i64, ptr, i64, ptr, i64, i64, f32, i32, i32],
    "rotary": [ptr, i64, i64, i64, i64, ptr, ptr, i32, i32],
    "silu_and_mul": [ptr, i64, ptr, i64, i64, i64, i32, i32],
    "write_kv": [ptr, i64, ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64],
    "write_kv_int8": [ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32],
    "apply_token_bitmask": [ptr, i64, ptr, i64, ptr, i64, i64],
    "row_absmax": [ptr, i64, i32, i64, i64, ptr, i32],
    "quantize_rows": [ptr, i64, i32, i64, i64, ptr, ptr, ptr, i32],
    "dequantize_rows": [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i32, i32],
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None  # why the kernels are unavailable; None until the first load attempt
_loaded = False


def _cache_dir() -> Path:
    home = os.environ.get("LIGHTSERVE_HOME") or os.path.join("~", ".cache", "lightserve")
    return Path(home).expanduser() / "kernels"


def _cpu_flags() -> str:
    """The CPU feature flags: a ``-march=native`` build must not be reused on another CPU."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _compiler() -> list[str]:
    """The compiler command: `$CC` as make reads it (it may carry words, e.g. "ccache gcc"), else
    gcc; its program resolved on PATH. RuntimeError if it is not there."""
    words = shlex.split(os.environ.get("CC") or _DEFAULT_COMPILER)
    program = shutil.which(words[0]) if words else None
    if program is None:
        name = os.environ.get("CC") or _DEFAULT_COMPILER
        raise RuntimeError(f"C compiler {name!r} not found on PATH (set $CC to choose another)")
    return [program, *words[1:]]


def _build(compiler: list[str]) -> Path:
    """Compile the kernels into the cache (once per sources/compiler/CPU) and return the path."""
    version = subprocess.run(  # `--version` names the compiler and its version, gcc and clang alike
        [*compiler, "--version"], capture_output=True, text=True, check=True, timeout=_COMPILE_TIMEOUT_S,
    ).stdout.strip()
    command = " ".join([*compiler, *_CFLAGS])
    parts = [s.read_bytes() for s in (*_SOURCES, *_HEADERS)] + [command.encode(), version.encode(), _cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    cache = _cache_dir()
    target = cache / f"{_LIBRARY}-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Build under a unique temporary name and rename: concurrent processes (one per tp rank)
    # may all compile, but each rename is atomic, so nobody ever loads a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=cache)
    os.close(fd)
    try:
        result = subprocess.run(
            [*compiler, *_CFLAGS, "-o", tmp, *map(str, _SOURCES)],
            capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = argtypes


def load() -> ctypes.CDLL | None:
    """The loaded library (built on the first call), or None if it cannot be built."""
    global _lib, _reason, _loaded
    with _lock:
        if _loaded:
            return _lib
        _loaded = True
        try:
            lib = ctypes.CDLL(str(_build(_compiler())))
            _declare(lib)
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _reason = str(e)
            logger.warning("CPU kernels unavailable, using the torch path: %s", _reason)
        return _lib


def require() -> ctypes.CDLL:
    """The loaded library; RuntimeError with the reason if it cannot be built."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"CPU kernels unavailable: {_reason}")
    return lib


def available() -> bool:
    """True if the C kernels are built and loaded (builds them on the first call)."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when the kernels loaded)."""
    load()
    return _reason
