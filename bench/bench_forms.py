"""Time one eSCN form on the bench batch: eager, torch.export (.pt2), AOTInductor or
compile=True, inference or a training step, in a fresh process per call. ``aoti`` is the
standalone package (``escn-export --aoti-standalone``), ``aoti-op`` the default one, which
calls the grid operator.

Reports wall-clock and process CPU time (time.process_time) per call after warm-up, the
minor page faults and kernel (system) time per call, and,
for compiled forms, the first call's (compile) time. Run the forms interleaved, in fresh
processes, to compare them on a shared machine:

    python bench/bench_forms.py --config tiny --form export --mode infer --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_model import CONFIGS, DEFAULT_BATCH, FORWARD_KEYS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--form", default="eager", choices=["eager", "export", "aoti", "aoti-op", "compile"])
    parser.add_argument("--mode", default="infer", choices=["infer", "train"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", default=str(DEFAULT_BATCH))
    parser.add_argument("--package-dir", default=None,
                        help="keep AOTI packages here and reuse them (one per config and form; the model's "
                             "weights come from the fixed seed, so a kept package is the one this run would build)")
    args = parser.parse_args(argv)

    import torch

    from escn_train.models.escn import eSCN

    torch.set_num_threads(args.threads)
    batch = torch.load(args.batch, weights_only=True)
    inputs = tuple(batch[k] for k in FORWARD_KEYS)
    torch.manual_seed(0)
    import inspect

    options = {"check_inputs": False} if "check_inputs" in inspect.signature(eSCN).parameters else {}
    model = eSCN(export=True, compile=args.form == "compile", **options, **CONFIGS[args.config])
    start = time.perf_counter()
    if args.form in ("export", "aoti", "aoti-op"):
        from escn_train.inference.export import dynamic_shapes

        import contextlib

        try:  # as escn-export traces and compiles AOTI packages (older commits: other modules, or plain export)
            from escn_train.models.fast.operators import inline_operators

            exporting_for_inductor = contextlib.nullcontext
        except ImportError:
            try:
                from escn_train.models.fast.geometry import exporting_for_inductor
                from escn_train.models.fast.grid import inline_operators
            except ImportError:
                exporting_for_inductor, inline_operators = contextlib.nullcontext, lambda program: program
        with torch.no_grad(), exporting_for_inductor() if args.form.startswith("aoti") else contextlib.nullcontext():
            program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes())
        call = program.module()
        if args.form.startswith("aoti"):  # aoti: standalone (operator inlined); aoti-op: calls the operator
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(args.package_dir or tmp)
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{args.config}-{args.form}.pt2"
                if not path.exists():
                    packaged = program
                    if args.form == "aoti":  # as escn-export --aoti-standalone builds it
                        try:
                            from escn_train.inference.export import native_grid_library

                            native = native_grid_library(program, print) is not None
                            packaged = inline_operators(program, native_grid=native)
                        except ImportError:  # older commits: no C++ operator
                            packaged = inline_operators(program)
                    torch._inductor.aoti_compile_and_package(packaged, package_path=str(path))
                if args.form == "aoti":  # a kept package may call the C++ operator: load it first
                    try:
                        from escn_train.models.fast import native_grid

                        native_grid.load()
                    except ImportError:
                        pass
                call = torch._inductor.aoti_load_package(str(path))
    else:
        call = model
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)

    def run() -> None:
        if args.mode == "infer":
            with torch.no_grad():
                call(*inputs)
            return
        energy, forces = call(*inputs)
        loss = energy.abs().mean() + forces.norm(dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    run()
    first = time.perf_counter() - start
    run()
    wall, cpu, faults, system = [], [], [], []
    for _ in range(args.steps):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        t, c = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - usage.ru_minflt)
        system.append(after.ru_stime - usage.ru_stime)
    print(json.dumps({**vars(args), "first_call_s": first, "wall_s": sorted(wall), "cpu_s": sorted(cpu),
                      "median_wall_s": sorted(wall)[len(wall) // 2], "median_cpu_s": sorted(cpu)[len(cpu) // 2],
                      "median_minor_faults": sorted(faults)[len(faults) // 2],
                      "median_system_s": sorted(system)[len(system) // 2]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
