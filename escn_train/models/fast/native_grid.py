"""The S2-grid stage as a C++ operator, ``escn_native::grid_silu``, for standalone AOTInductor packages.

Standalone packages (``escn-export --aoti-standalone``) run without Python, so they cannot
call :mod:`.grid`'s Python operator. On CPUs they call this one instead: the same blocked
forward, with :mod:`.cpu_kernel`'s kernel on each block (``grid_native.cpp`` includes
``grid_kernel.c``). escn-export writes the compiled library beside the package; a C++ host
loads it (``dlopen``) before the package, and :func:`load` does it in Python.

It is built on first use with the C++ compiler (``$CXX``, else ``c++``) against this
torch's headers and libraries (~15 s), into the kernels' cache (:func:`.cpu_kernel.cache_dir`).
It runs where the kernel runs (:func:`unsupported_reason`); elsewhere standalone packages compile the
stage's plain expressions, as before. This module imports nothing of the model, so that
loading a package loads no model code.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import torch

from escn_train.models.fast import cpu_kernel

SOURCE = Path(__file__).with_name("grid_native.cpp")
#: The operator's name, as packages record it.
OPERATOR = "escn_native::grid_silu"

_lock = threading.Lock()
_loaded: Path | None = None


def unsupported_reason(features: torch.Tensor) -> str | None:
    """Why features like ``features`` [edges, coefficients, channels] (a fake tensor will do)
    cannot go through the operator, or None: where the kernel it calls does not apply."""
    return cpu_kernel.features_unsupported_reason(features) or cpu_kernel.unsupported_reason()


def _flags() -> tuple[list[str], list[str]]:
    """Compiler flags and linker arguments for this torch's headers and libraries."""
    from torch.utils import cpp_extension  # its import is slow; only builds need it

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{path}" for path in cpp_extension.include_paths()] + [f"-I{SOURCE.parent}"]
    folders = cpp_extension.library_paths()
    # The version define only keys the cached build to this torch.
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             f"-DESCN_TORCH_VERSION={torch.__version__}", *includes]
    links = [f"-L{path}" for path in folders] + [f"-Wl,-rpath,{path}" for path in folders]
    return flags, [*links, "-lc10", "-ltorch_cpu", "-ltorch"]


def library_path() -> Path:
    """The operator's compiled library for this torch, built into the cache unless already there."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler '{compiler}' on PATH (set CXX)")
    if not Path(torch.__file__).parent.joinpath("include", "torch", "library.h").exists():
        raise RuntimeError(f"this torch ({torch.__version__}) was installed without its C++ headers")
    flags, libraries = _flags()
    return cpu_kernel.build_library(compiler, flags, SOURCE, [cpu_kernel.SOURCE], libraries)


def load() -> Path:
    """Build (once per machine) and load the operator into this process; its library's path."""
    global _loaded
    with _lock:
        if _loaded is None:
            path = library_path()
            torch.ops.load_library(str(path))
            torch.library.register_fake(OPERATOR)(_fake)
            _loaded = path
    return _loaded


def check_recorded(recorded: dict[str, str], path: object) -> None:
    """Load the operator for a package that records it, and refuse one recorded with another signature."""
    try:
        load()
    except (OSError, RuntimeError) as error:
        raise ValueError(
            f"{path}: calls the C++ S2-grid operator {OPERATOR}, which could not be built here "
            f"({str(error).splitlines()[0]}); install a C++ compiler, or export it again without --aoti-standalone"
        ) from None
    schema = str(torch.ops.escn_native.grid_silu.default._schema)
    if recorded.get(OPERATOR, schema) != schema:
        raise ValueError(
            f"{path}: calls {OPERATOR} with the signature {recorded[OPERATOR]!r}, but this escn-train's is "
            f"{schema!r}; export it again from its checkpoint with this version's escn-export"
        )


def _fake(y, to_grid, from_grid, rows, group_atom, num_atoms, size, floats_per_thread, max_threads):
    if rows is None:
        return y.new_empty(y.shape[0], from_grid.shape[0], y.shape[2])
    return y.new_empty(num_atoms, rows.shape[2], y.shape[2])
