"""Export a trained potential for deployment: a ``torch.export`` program and an AOTInductor package.

What is exported is ``ESCNPotential.forward`` (network and normalisers: eV and eV/Å)::

    (pos [N,3], batch_idx [N], natoms [B], atomic_numbers [N],
     edge_index [2,E], edge_distance [E], edge_distance_vec [E,3]) -> (energy [B], forces [N,3])

with dynamic atom, edge and structure counts (each at least 1). The graph is built outside
the program (``escn_train.graph.radius_graph_pbc``); what it needs travels inside the files as
a JSON document (:data:`escn_train.inference.loading.METADATA_KEY`: eSCN arguments, cutoff,
max_neighbors, max_num_elements, normalisers, units, source checkpoint, weights used):

* ``NAME.pt2``: ``torch.export.save`` archive, the JSON as an extra file. Device-portable.
* ``NAME.aoti.pt2``: AOTInductor package compiled for one device type, the JSON in the
  package metadata (``aot_inductor.metadata``), readable without loading the library. It
  calls the fast stages' operators as eager code runs them (Python registers them:
  ``import escn_train.models.fast.operators``); ``--aoti-standalone`` compiles their plain
  expressions in instead, for loaders without Python; on CPUs its S2-grid stage calls a C++
  operator, written beside it as ``NAME.aoti.so``, which such a loader loads first.

Both load with :func:`escn_train.inference.loading.load_predictor` (no Lightning needed),
with ``trusted=True``: they are code.
After writing, each file is checked against the eager model on structures of several sizes.

Example::

    escn-export runs/best.ckpt -o deploy/escn            # deploy/escn.pt2, deploy/escn.aoti.pt2
    escn-export runs/best.ckpt -o deploy/escn --format export --device cpu
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.export import Dim

from escn_train.graph import radius_graph_pbc
from escn_train.models.compiled import FORWARD_DYNAMIC_DIMS
from escn_train.models.fast.operators import called_operators, grid_operator_inputs, inline_operators
from escn_train.inference.loading import (
    AOTI_PACKAGE,
    EXPORTED_PROGRAM,
    METADATA_KEY,
    ModelInfo,
    load_checkpoint_potential,
    load_predictor,
    metadata_dict,
    resolve_device,
)

#: Agreement with the eager model required after export, relative to the largest value.
#: Exported programs run eager mode's computation (``models/fast/``) with the S2-grid stage
#: unblocked, and compiled code reorders and fuses float32 sums. eSCN's outputs cancel heavily, which amplifies that round-off (~1e-5 of
#: max |F| for small untrained models): the bounds guard against gross errors, the tests
#: check the fixture-based bounds.
TOLERANCE = {EXPORTED_PROGRAM: 1e-4, AOTI_PACKAGE: 1e-3}


def dynamic_shapes() -> tuple[dict[int, Dim], ...]:
    """Dynamic dimensions of the seven forward arguments (atoms, edges, structures ≥ 1)."""
    counts = {name: Dim(f"num_{name}", min=1) for name in ("atoms", "edges", "structures")}
    return tuple({dim: counts[count]} for dim, count in FORWARD_DYNAMIC_DIMS)


def sample_structures(
    sizes: Sequence[int], max_num_elements: int, seed: int = 0, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """A batch of random periodic structures (``sizes`` atoms each, ~12 Å^3 per atom) as tensors."""
    generator = torch.Generator().manual_seed(seed)
    natoms = torch.tensor(list(sizes), dtype=torch.long)
    total = int(natoms.sum())
    edge = (12.0 * natoms.double()) ** (1.0 / 3.0)
    cell = torch.diag_embed(edge.unsqueeze(1).expand(-1, 3)).float()
    cell = cell + 0.3 * torch.rand(len(sizes), 3, 3, generator=generator)  # triclinic
    batch = torch.repeat_interleave(torch.arange(len(sizes)), natoms)
    frac = torch.rand(total, 3, generator=generator)
    pos = torch.bmm(frac.unsqueeze(1), cell[batch]).squeeze(1)
    elements = torch.tensor([1, 6, 7, 8, 13, 26, 29, 46, 78, 79])
    elements = elements[elements < max_num_elements]
    atomic_numbers = elements[torch.randint(len(elements), (total,), generator=generator)]
    tensors = {"pos": pos, "cell": cell, "natoms": natoms, "batch": batch, "atomic_numbers": atomic_numbers}
    return {k: v.to(device) for k, v in tensors.items()}


def forward_args(structures: dict[str, torch.Tensor], info: ModelInfo) -> tuple[torch.Tensor, ...]:
    """``ESCNPotential.forward`` arguments of :func:`sample_structures` output."""
    s = structures
    graph = radius_graph_pbc(s["pos"], s["cell"], s["natoms"], info.cutoff, info.max_neighbors)
    return (s["pos"], s["batch"], s["natoms"], s["atomic_numbers"], graph.edge_index, graph.edge_distance,
            graph.edge_distance_vec)


def export_program(potential: torch.nn.Module, info: ModelInfo, device: torch.device) -> torch.export.ExportedProgram:
    """Trace ``potential.forward`` with dynamic atom, edge and structure counts."""
    potential = potential.to(device).eval()
    example = forward_args(sample_structures([5, 8], info.max_num_elements, device=device), info)
    with torch.no_grad():
        return torch.export.export(potential, example, dynamic_shapes=dynamic_shapes())


def save_exported_program(program: torch.export.ExportedProgram, path: Path, info: ModelInfo, device: torch.device) -> Path:
    meta = metadata_dict(info, EXPORTED_PROGRAM, exported_on=device.type, min_atoms=1, min_edges=1,
                         operators=called_operators(program))
    torch.export.save(program, str(path), extra_files={METADATA_KEY: json.dumps(meta)})
    return path


def native_library_path(package: Path) -> Path:
    """Where escn-export writes the C++ S2-grid operator beside a standalone package: ``NAME.aoti.so``."""
    return package.with_suffix(".so")


def save_aoti_package(
    program: torch.export.ExportedProgram, path: Path, info: ModelInfo, device: torch.device, standalone: bool = False,
    log=print,
) -> Path:
    """Compile with AOTInductor (minutes for large models) into ``path``.

    By default the package calls the fast stages' operators (the blocked S2-grid stage, the
    SO(2) stage and the first layer) through the dispatcher, as eager code runs them:
    loading it in Python needs ``import escn_train.models.fast.operators`` first
    (:func:`load_predictor` does it). ``standalone`` compiles their plain expressions into
    the package instead, for runtimes without Python (C++ ``AOTIModelPackageLoader``),
    except, on CPUs, the S2-grid stage: it calls the C++ operator of
    :mod:`escn_train.models.fast.native_grid`, whose library is written beside the package
    (:func:`native_library_path`; the host loads it first). Where that operator cannot be
    used (CUDA, channels not a multiple of 16, no C++ compiler), the stage is compiled in too,
    which is slower on CPUs (bench/RESULTS.md).
    """
    packaged, library = program, None
    if standalone:
        library = native_grid_library(program, log)
        packaged = inline_operators(program, native_grid=library is not None)
    meta = metadata_dict(info, AOTI_PACKAGE, exported_on=device.type, min_atoms=1, min_edges=1,
                         operators=called_operators(packaged))
    torch._inductor.aoti_compile_and_package(
        packaged,
        package_path=str(path),
        inductor_configs={"aot_inductor.metadata": {METADATA_KEY: json.dumps(meta)}},
    )
    if library is not None:
        shutil.copyfile(library, native_library_path(path))
        log(f"wrote {native_library_path(path)}: the S2-grid operator; load it before the package in C++ hosts")
    return path


def native_grid_library(program: torch.export.ExportedProgram, log) -> Path | None:
    """The C++ S2-grid operator's library for a standalone package of ``program``, built and
    loaded; None (and why, logged) where the package compiles the stage's expressions instead."""
    from escn_train.models.fast import native_grid

    reasons = {native_grid.unsupported_reason(features) for features in grid_operator_inputs(program)} - {None}
    if not reasons:
        try:
            return native_grid.load()
        except (OSError, RuntimeError) as error:
            reasons = {f"it could not be built: {str(error).splitlines()[0]}"}
    log(f"the standalone package compiles the S2-grid stage's expressions (slower on CPUs) instead of calling the C++ "
        f"operator: {'; '.join(sorted(reasons))}")
    return None


def agreement(potential: torch.nn.Module, path: Path, info: ModelInfo, device: torch.device) -> dict[str, float]:
    """Largest deviation of the written file from the eager model, relative to the largest
    value, over batches of several sizes (one structure of one atom included)."""
    predictor = load_predictor(path, device, trusted=True)  # the file this process just wrote
    worst = {"energy": 0.0, "forces": 0.0}
    for seed, sizes in enumerate(([1], [3, 11], [24], [2, 7, 4, 16])):
        args = forward_args(sample_structures(sizes, info.max_num_elements, seed=seed + 1, device=device), info)
        with torch.no_grad():
            expected = potential(*args)
            got = predictor.forward(*args)
        for key, e, g in zip(("energy", "forces"), expected, got):
            scale = max(e.abs().max().item(), 1e-6)
            worst[key] = max(worst[key], (g - e).abs().max().item() / scale)
    return worst


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    formats: Sequence[str] = ("export", "aoti"),
    device: str | torch.device = "auto",
    use_ema: bool = True,
    check: bool = True,
    log=print,
    aoti_standalone: bool = False,
) -> list[Path]:
    """Write ``OUTPUT.pt2`` and/or ``OUTPUT.aoti.pt2`` for a checkpoint; returns the paths."""
    device = resolve_device(device)
    output = Path(output)
    if output.suffix == ".pt2":
        output = output.with_suffix("")
    output.parent.mkdir(parents=True, exist_ok=True)
    potential, info = load_checkpoint_potential(checkpoint, use_ema)
    potential = potential.to(device)
    log(f"loaded {checkpoint} ({info.weights} weights; cutoff {info.cutoff} Å, max_neighbors {info.max_neighbors})")
    written = []
    targets = []
    if "export" in formats:
        targets.append((EXPORTED_PROGRAM, output.with_name(output.name + ".pt2"), save_exported_program))
    if "aoti" in formats:
        targets.append((AOTI_PACKAGE, output.with_name(output.name + ".aoti.pt2"),
                        functools.partial(save_aoti_package, standalone=aoti_standalone, log=log)))
    program = None
    for kind, path, save in targets:
        if program is None:  # one trace serves both formats
            started = time.perf_counter()
            program = export_program(potential, info, device)
            log(f"traced with torch.export in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        if kind == AOTI_PACKAGE:
            log(f"compiling the AOTInductor package for {device.type} (this can take minutes) ...")
        save(program, path, info, device)
        log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s)")
        written.append(path)
        if check:
            worst = agreement(potential, path, info, device)
            status = "ok" if max(worst.values()) <= TOLERANCE[kind] else "EXCEEDS TOLERANCE"
            log(
                f"  agreement with the eager model: energy {worst['energy']:.2e}, forces {worst['forces']:.2e} "
                f"(relative to the largest value; tolerance {TOLERANCE[kind]:.0e}): {status}"
            )
            if status != "ok":
                raise RuntimeError(f"{path}: exported model disagrees with the eager model: {worst}")
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="escn-export",
        description="Export a trained eSCN potential (with its normalisers) as a torch.export program "
        "and an AOTInductor package, with dynamic atom, edge and structure counts.",
    )
    parser.add_argument("checkpoint", help="escn-train checkpoint (.ckpt) or fairchem/OCP eSCN checkpoint")
    parser.add_argument("-o", "--output", required=True, help="output path without extension (writes OUTPUT.pt2, OUTPUT.aoti.pt2)")
    parser.add_argument("--format", choices=["both", "export", "aoti"], default="both", help="what to write (default both)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]: AOTInductor packages only run on this device type")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even if the checkpoint has EMA weights")
    parser.add_argument("--no-check", action="store_true", help="skip the agreement check against the eager model")
    parser.add_argument(
        "--aoti-standalone", action="store_true",
        help="AOTInductor package that runs without Python (C++ loaders): compiles the operators' plain expressions "
        "in, except on CPUs the S2-grid stage, which calls a C++ operator written beside it as OUTPUT.aoti.so "
        "(load it first); by default the package calls the Python-registered operators")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``escn-export``)."""
    args = build_parser().parse_args(argv)
    formats = ("export", "aoti") if args.format == "both" else (args.format,)
    try:
        export_checkpoint(args.checkpoint, args.output, formats, args.device, not args.no_ema, not args.no_check,
                          aoti_standalone=args.aoti_standalone)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"escn-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
