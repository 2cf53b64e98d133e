"""Compile a C source shipped with the package into a shared library, once per machine, and load it.

We compile on the user's machine (with `-march=native`) instead of shipping binaries: the kernels are
a few dozen lines, the C compiler that every Linux box with Python headers has builds them in about a
second, and the result is tuned for the CPU it runs on. The library is cached under
`$QWEN2VL_CACHE_DIR` (default `~/.cache/qwen2vl`)/native, named by a hash of the source (and the
shared headers), the compiler, the flags and the CPU, so an edit, a new compiler or a different CPU
rebuilds it; the file is written under a temporary name and renamed, so parallel processes never
load half a file.

Nothing here is required: `load()` returns None (and says why once, in the log) when there is no
compiler, the build fails, or `QWEN2VL_NATIVE=0` is set; callers then use their torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
# -fopenmp is required: the kernels split their rows over torch's own OpenMP threads (see the .c files).
# -ffp-contract=off: a * b + c stays two roundings, as in torch's separate ops (GCC fuses by default)
FLAG_SETS = (["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"], ["-O3", "-fopenmp", "-ffp-contract=off"])


def enabled() -> bool:
    return os.environ.get("QWEN2VL_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("QWEN2VL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qwen2vl")
    return Path(root) / "native"


def find_compiler() -> str | None:
    """$CC if set, else the first of cc / gcc / clang on PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"]) or os.environ["CC"]
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def _cpu_signature() -> str:
    """What -march=native depends on: the architecture and, on Linux, the CPU model and feature flags."""
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return text
    wanted = ("model name", "flags", "Features", "CPU part")
    return text + "".join(sorted({line for line in info if line.split(":")[0].strip() in wanted}))


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The shared library built from `<name>.c` beside this file, or None (see the module docstring)."""
    if not enabled():
        logger.info("native %s: disabled by QWEN2VL_NATIVE", name)
        return None
    source = SOURCE_DIR / f"{name}.c"
    compiler = find_compiler()
    if compiler is None:
        logger.warning("native %s: no C compiler (cc, gcc, clang or $CC) found; using the torch path", name)
        return None
    # what the library depends on besides the flags: its source, the shared headers, compiler and CPU
    inputs = [source.read_text(), *(h.read_text() for h in sorted(SOURCE_DIR.glob("*.h"))), compiler,
              _cpu_signature()]
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256("\0".join([*inputs, " ".join(flags)]).encode()).hexdigest()[:16]
        target = cache_dir() / f"{name}-{key}.so"
        if not target.exists():
            error = _compile(compiler, flags, source, target)
            if error:
                errors.append(f"{' '.join(flags)}: {error}")
                continue
        try:
            return ctypes.CDLL(str(target))
        except OSError as exc:
            errors.append(f"loading {target}: {exc}")
    logger.warning("native %s: could not build with %s; using the torch path (%s)", name, compiler,
                   " | ".join(errors))
    return None


def function(library: str, name: str, argtypes: list, restype=None):
    """`name` from the library built from `<library>.c` with its ctypes signature set, or None."""
    lib = load(library)
    if lib is None:
        return None
    fn = getattr(lib, name)
    if fn.argtypes is None:
        fn.argtypes, fn.restype = argtypes, restype
    return fn


def _compile(compiler: str, flags: list[str], source: Path, target: Path) -> str | None:
    """Build source -> target atomically; returns None on success, else the compiler's complaint."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        return f"cannot write to {target.parent}: {exc}"
    cmd = [compiler, *flags, "-shared", "-fPIC", "-o", tmp, str(source)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return (done.stderr.strip().splitlines() or ["exit status %d" % done.returncode])[-1][:300]
        os.replace(tmp, target)
        logger.info("native %s: built %s", source.stem, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
