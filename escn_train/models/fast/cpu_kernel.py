"""The S2-grid stage's fused CPU kernel (``grid_kernel.c``): built once per machine, loaded with ctypes.

On CPUs the grid stage is memory- and latency-bound: PyTorch runs its two small products
(K, P of 7..70) and the SiLU as separate passes over each block of edges. The kernel keeps
each edge's grid values in L1 and computes exp in the same pass (bench batch, L3 M1, 7600
edges x 64 channels: forward 26-29 ms -> 8-12 ms, backward 20-27 ms -> 11-15 ms at 2
threads; bench/RESULTS.md). It runs on PyTorch's OpenMP threads (the library links the
``libgomp`` that torch has loaded), as many as ``torch.get_num_threads()``.

It is used for float32 CPU tensors with a channel count that is a multiple of 16, on
x86-64 Linux with AVX2 and FMA. It is built on first use with the C compiler (``$CC``, else
``cc``) into ``$ESCN_TRAIN_CACHE/kernels`` (default ``~/.cache/escn_train/kernels``; the
temporary directory where that cannot be created), keyed by the source and flags. ``ESCN_TRAIN_GRID_KERNEL=0`` turns it off. Everywhere else, and if
the build fails (one warning says why), :mod:`.grid` runs the same expressions as PyTorch
operations. Both paths are tested against the reference expressions.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Sequence

import torch

SOURCE = Path(__file__).with_name("grid_kernel.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
#: Channels per slice of the kernel: tensors whose channel count is not a multiple run PyTorch's operations.
SLICE = 16
SWITCH = "ESCN_TRAIN_GRID_KERNEL"

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    """Where built kernels are kept: ``$ESCN_TRAIN_CACHE/kernels``, else ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    root = os.environ.get("ESCN_TRAIN_CACHE")
    if root:
        return Path(root) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "escn_train" / "kernels"


def unsupported_reason() -> str | None:
    """Why this machine does not use the kernel, or None when it does."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernel is for x86-64 Linux, this is {platform.system()} {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU has no AVX2 ({torch.backends.cpu.get_cpu_capability()})"
    return None


def build_library(
    compiler: str, flags: Sequence[str], source: Path, includes: Sequence[Path] = (), libraries: Sequence[str] = ()
) -> Path:
    """The shared library compiled from ``source`` with ``compiler`` and ``flags`` and linked
    with ``libraries`` (linker arguments, after the source) into the cache, unless already
    there; it is keyed by the bytes of ``source`` and of the files it includes
    (``includes``), the compiler and the arguments."""
    content = b"".join(path.read_bytes() for path in (source, *includes))
    key = hashlib.sha256(content + " ".join((compiler, *flags, *libraries)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home (containers, some clusters): this user's temporary directory
        target = Path(tempfile.gettempdir()) / f"escn_train-kernels-{os.getuid()}" / target.name
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: processes building at once (DDP ranks) never
    # load a half-written file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, "-o", partial, str(source), *libraries], capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            raise RuntimeError(lines[0] if lines else f"exit status {result.returncode}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _load() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler '{compiler}' on PATH (set CC)")
    library = ctypes.CDLL(str(build_library(compiler, FLAGS, SOURCE)))
    pointer, length, integer = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    library.escn_grid_forward.argtypes = [pointer, length, integer, length, pointer, pointer, integer, pointer, integer]
    library.escn_grid_backward.argtypes = [
        pointer, pointer, length, integer, length, pointer, pointer, pointer, integer, pointer, integer
    ]
    return library


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; None where it is not used (warned once if its build failed)."""
    global _library, _tried
    if _tried:
        return _library
    with _lock:
        if not _tried:
            if unsupported_reason() is None:
                try:
                    _library = _load()
                except (OSError, RuntimeError) as error:
                    warnings.warn(
                        f"escn_train: could not build the CPU grid kernel {SOURCE.name} ({error}); the S2-grid stage "
                        f"runs PyTorch operations instead (about 2x slower); set {SWITCH}=0 to skip the build",
                        RuntimeWarning, stacklevel=3,
                    )
            _tried = True
    return _library


def reset() -> None:
    """Forget the loaded kernel, so that the next call decides again (tests, a changed environment)."""
    global _library, _tried
    with _lock:
        _library, _tried = None, False


def features_unsupported_reason(features: torch.Tensor) -> str | None:
    """Why the kernel cannot take features like ``features`` [edges, coefficients, channels]
    (a fake tensor will do), whatever the machine; None when it can."""
    if features.device.type != "cpu":
        return f"the kernel is for CPUs, the features are on {features.device.type}"
    if features.dtype != torch.float32:
        return f"the kernel takes float32 features, not {features.dtype}"
    if features.dim() != 3:
        return f"the kernel takes features [edges, coefficients, channels], not {features.dim()} dimensions"
    if features.shape[-1] % SLICE:
        return f"{features.shape[-1]} channels are not a multiple of {SLICE}"
    return None


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: the first is features it takes
    (:func:`features_unsupported_reason`), all are float32 CPU and contiguous, and it is built."""
    if features_unsupported_reason(tensors[0]) is not None:
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return False
    return library() is not None


def grid_forward(y: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor, out: torch.Tensor) -> bool:
    """out = from_grid @ SiLU(to_grid @ y) for y, out [E, K, C]; False (out untouched) where the kernel does not apply."""
    if not applies(y, to_grid, from_grid, out):
        return False
    status = _library.escn_grid_forward(
        y.data_ptr(), y.shape[0], y.shape[1], y.shape[2], to_grid.data_ptr(), from_grid.data_ptr(),
        to_grid.shape[0], out.data_ptr(), torch.get_num_threads(),
    )
    if status:
        raise MemoryError(f"the CPU grid kernel could not allocate its scratch rows ({to_grid.shape[0]} points)")
    return True


def grid_backward(
    grad: torch.Tensor, y: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor, out: torch.Tensor
) -> bool:
    """out = to_gridᵀ @ (SiLU'(to_grid @ y) * (from_gridᵀ @ grad)), the gradient of :func:`grid_forward`
    for y; False (out untouched) where the kernel does not apply."""
    if not applies(y, grad, to_grid, from_grid, out):
        return False
    from_grid_t, to_grid_t = from_grid.t().contiguous(), to_grid.t().contiguous()
    status = _library.escn_grid_backward(
        grad.data_ptr(), y.data_ptr(), y.shape[0], y.shape[1], y.shape[2], to_grid.data_ptr(),
        from_grid_t.data_ptr(), to_grid_t.data_ptr(), to_grid.shape[0], out.data_ptr(), torch.get_num_threads(),
    )
    if status:
        raise MemoryError(f"the CPU grid kernel could not allocate its scratch rows ({to_grid.shape[0]} points)")
    return True
