"""escn-export: torch.export programs and AOTInductor packages of ESCNPotential.

Each file is loaded in a fresh interpreter that imports only torch, escn_train.graph and
the loader (no Lightning, e3nn, PyG or model code) and must reproduce the eager
potential on batches of several sizes: one atom, one structure, many structures,
molecules without a cell, slabs, and a structure without any edge.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from reference_fixtures import build_model, fixture_batch, frame_tolerance, load_fixture

from escn_train.data.collate import collate_structures
from escn_train.data.convert import atoms_to_data
from escn_train.inference.export import forward_args, main, native_library_path, sample_structures
from escn_train.inference.loading import (
    METADATA_KEY,
    aoti_package_metadata,
    load_checkpoint_potential,
    load_predictor,
)
from escn_train.inference.reference_checkpoint import potential_checkpoint
from escn_train.models.potential import ESCNPotential

NAME = "tiny_l2m1"
ENERGY_MEAN, ENERGY_STD, FORCE_STD = -0.75, 2.5, 40.0

LOADER_SCRIPT = r"""
import json, sys
from types import SimpleNamespace
import torch
from escn_train.inference.loading import load_predictor

predictor = load_predictor(sys.argv[1], "cpu", trusted=True)
results = []
for case in torch.load(sys.argv[2], weights_only=True):
    energy, forces = predictor.predict(SimpleNamespace(**case["batch"]))
    results.append({
        "energy": (energy - case["energy"]).abs().max().item(),
        "forces": (forces - case["forces"]).abs().max().item(),
        "energy_scale": case["energy"].abs().max().item(),
        "forces_scale": case["forces"].abs().max().item(),
    })
# ASE is not listed: vesin (the neighbour search) imports it when it is installed.
heavy = ("lightning", "pytorch_lightning", "hydra", "e3nn", "torch_geometric")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy
                or m.startswith(("escn_train.models", "escn_train.training", "escn_train.data")))
print(json.dumps({"kind": predictor.kind, "info": predictor.info.model, "results": results, "loaded": loaded}))
"""


#: What loading a standalone CPU package imports: the C++ S2-grid operator's loader.
NATIVE_MODULES = ["escn_train.models", "escn_train.models.fast", "escn_train.models.fast.cpu_kernel",
                  "escn_train.models.fast.native_grid"]

#: A C++ host's view of a standalone package, in a process that imports nothing of escn_train:
#: load the operator's library written beside the package, then the package.
HOST_SCRIPT = r"""
import json, sys
import torch
torch.ops.load_library(sys.argv[2])
runner = torch._inductor.aoti_load_package(sys.argv[1])
worst = {"energy": 0.0, "forces": 0.0}
for case in torch.load(sys.argv[3], weights_only=True):
    with torch.no_grad():
        got = dict(zip(("energy", "forces"), runner(*case["args"])))
    for key in worst:
        error = (got[key] - case[key]).abs().max().item() / case[key].abs().max().item()
        worst[key] = max(worst[key], error)
print(json.dumps({"worst": worst, "cases": len(torch.load(sys.argv[3], weights_only=True)),
                  "escn_train": sorted(m for m in sys.modules if m.startswith("escn_train"))}))
"""

OPERATOR_MODULES = ["escn_train.models", "escn_train.models.fast", "escn_train.models.fast.cpu_kernel",
                    "escn_train.models.fast.geometry",
                    "escn_train.models.fast.grid", "escn_train.models.fast.operators", "escn_train.models.fast.slots",
                    "escn_train.models.fast.so2", "escn_train.models.workspace"]

def potential() -> ESCNPotential:
    refs = torch.zeros(90)
    refs[[1, 6, 8, 29, 47, 78]] = torch.tensor([-3.4, -7.2, -4.9, -3.7, -2.8, -6.1])
    return ESCNPotential(build_model(NAME), ENERGY_MEAN, ENERGY_STD, FORCE_STD, refs).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """EMA copy = the fixture's weights; raw weights perturbed (the export must use the EMA)."""
    averaged = potential()
    raw = potential()
    with torch.no_grad():
        for p in raw.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("export") / "model.ckpt"
    torch.save(potential_checkpoint(raw, load_fixture(NAME)["config"], ema_potential=averaged), path)
    return path


def _atoms_batch(structures: list[Atoms]):
    return collate_structures(
        [atoms_to_data(a, i, 0, "test", require_labels=False, require_cell=False) for i, a in enumerate(structures)]
    )


def _cases() -> list:
    """Batches of several sizes (one atom; one, two, four and six structures; a molecule
    without a cell with an in-plane periodic slab), with the eager potential's predictions."""
    slab = fcc111("Cu", (2, 2, 3), vacuum=None)
    slab.pbc, slab.cell[2] = [True, True, False], [0.0, 0.0, 0.0]
    batches = [fixture_batch(NAME, s) for s in ([1], [2, 3], [0, 1, 2, 3], [0, 2, 0, 2, 0, 2])]
    batches += [_atoms_batch([bulk("Cu")]), _atoms_batch([molecule("CH3CH2OH"), slab])]
    model = potential()
    cases = []
    for batch in batches:
        with torch.no_grad():
            out = model.forward_trainable(batch)
        fields = {k: getattr(batch, k) for k in ("pos", "cell", "natoms", "atomic_numbers", "batch")}
        if getattr(batch, "pbc", None) is not None:
            fields["pbc"] = batch.pbc
        cases.append({"batch": fields, "energy": out["energy"], "forces": out["forces"]})
    return cases


def run_loader(path: Path, tmp_path: Path, cases: list) -> dict:
    cases_file = tmp_path / "cases.pt"
    torch.save(cases, cases_file)
    result = subprocess.run(
        [sys.executable, "-c", LOADER_SCRIPT, str(path), str(cases_file)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_exported_program_reproduces_eager_without_training_code(checkpoint, tmp_path, capsys):
    assert main([str(checkpoint), "-o", str(tmp_path / "escn"), "--format", "export", "--device", "cpu"]) == 0
    assert "agreement with the eager model" in capsys.readouterr().out
    path = tmp_path / "escn.pt2"
    extra = {METADATA_KEY: ""}
    torch.export.load(str(path), extra_files=extra)
    meta = json.loads(extra[METADATA_KEY])
    config = load_fixture(NAME)["config"]
    assert meta["artifact"] == "exported_program" and meta["weights"] == "ema"
    assert (meta["cutoff"], meta["max_neighbors"], meta["max_num_elements"]) == (6.0, 20, 90)
    assert all(meta["model"][k] == v for k, v in config.items())
    assert meta["normalizers"]["energy_std"] == pytest.approx(ENERGY_STD)
    assert meta["normalizers"]["element_references"][29] == pytest.approx(-3.7)
    # The operators the program calls, with their signatures (checked when it is loaded).
    from escn_train.models.fast.operators import operator_schema

    assert {"escn_train::so2_stage", "escn_train::grid_silu", "escn_train::first_layer"} <= set(meta["operators"])
    assert meta["operators"] == {name: operator_schema(name) for name in sorted(meta["operators"])}

    cases = _cases()
    out = run_loader(path, tmp_path, cases)
    # Only the modules that register the program's operators, not the model itself.
    assert out["kind"] == "exported_program"
    assert out["loaded"] == OPERATOR_MODULES
    assert len(out["results"]) == len(cases) == 6
    for r in out["results"]:
        # float32 round-off of per-edge (program) vs per-group (eager) sums; see TOLERANCE
        assert r["energy"] <= 5e-5 * r["energy_scale"]
        assert r["forces"] <= 5e-5 * r["forces_scale"]


def test_structures_without_edges_are_predicted(checkpoint, tmp_path, device):
    """The network cannot run on a graph without edges; the predictor pads with a throw-away
    structure. An edge-free structure gets the same prediction alone and next to others."""
    assert main([str(checkpoint), "-o", str(tmp_path / "escn"), "--format", "export", "--device", device.type,
                 "--no-check"]) == 0
    lonely = Atoms("CuO", positions=[[0, 0, 0], [0, 0, 9.0]])
    for predictor in (load_predictor(checkpoint, device), load_predictor(tmp_path / "escn.pt2", device, trusted=True)):
        alone_e, alone_f = predictor.predict(_atoms_batch([lonely]))
        both_e, both_f = predictor.predict(_atoms_batch([lonely, bulk("Cu")]))
        assert alone_e.shape == (1,) and alone_f.shape == (2, 3)
        torch.testing.assert_close(alone_e, both_e[:1])
        torch.testing.assert_close(alone_f, both_f[:2])


def test_metadata_is_required(tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(Tiny(), (torch.ones(3),)), str(plain))
    with pytest.raises(ValueError, match=r"plain\.pt2: torch\.export program without 'escn_train\.json'"):
        load_predictor(plain, "cpu", trusted=True)
    text = tmp_path / "notes.pt2"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=r"notes\.pt2: not a torch\.export program or AOTInductor package \(not a zip"):
        load_predictor(text, "cpu", trusted=True)


@pytest.fixture(scope="module", params=["operator", "standalone"])
def aoti_package(request, checkpoint, tmp_path_factory) -> Path:
    """One AOTInductor build per form for this module (~20 s each on two cores): calling the
    grid operator (the default) or standalone (``--aoti-standalone``)."""
    output = tmp_path_factory.mktemp(f"aoti_{request.param}") / "escn"
    extra = ["--aoti-standalone"] if request.param == "standalone" else []
    assert main([str(checkpoint), "-o", str(output), "--format", "aoti", "--device", "cpu", "--no-check", *extra]) == 0
    return output.with_name("escn.aoti.pt2")


@pytest.mark.slow
def test_aoti_package_reproduces_eager_without_training_code(aoti_package, tmp_path):
    from escn_train.models.fast.operators import OPERATORS

    meta = aoti_package_metadata(aoti_package)
    assert meta["AOTI_DEVICE_KEY"] == "cpu"
    standalone = aoti_package.parent.name.startswith("aoti_standalone")
    document = json.loads(meta[METADATA_KEY])
    assert document["max_neighbors"] == 20
    if standalone:  # calls only the C++ S2-grid operator, whose library is written beside the package
        from escn_train.models.fast import native_grid

        native_grid.load()
        assert document["operators"] == {
            native_grid.OPERATOR: str(torch.ops.escn_native.grid_silu.default._schema)
        }
        assert native_library_path(aoti_package).is_file()
    else:
        from escn_train.models.fast.operators import operator_schema

        assert {"escn_train::so2_stage", "escn_train::grid_silu", "escn_train::first_layer"} <= set(document["operators"])
        assert set(document["operators"]) <= set(OPERATORS)
        assert document["operators"] == {name: operator_schema(name) for name in sorted(document["operators"])}
    with zipfile.ZipFile(aoti_package) as archive:
        assert any(n.endswith(".so") for n in archive.namelist())

    cases = _cases()
    out = run_loader(aoti_package, tmp_path, cases)
    # A standalone package loads no model code, only its C++ operator; the default one the operators' modules.
    # The loader reads the C++ operator's name from native_grid (no model code) for every package.
    expected = NATIVE_MODULES if standalone else sorted({*OPERATOR_MODULES, "escn_train.models.fast.native_grid"})
    assert out["kind"] == "aoti_package" and out["loaded"] == expected
    fixture = load_fixture(NAME)
    # Compiled kernels reorder float32 sums: the fixture's intrinsic round-off bound (as in
    # test_model_export), in physical units, plus float32 rounding of the energy offsets.
    for r in out["results"]:
        assert r["energy"] <= frame_tolerance(fixture, "energy") * ENERGY_STD + 2e-6 * r["energy_scale"]
        assert r["forces"] <= frame_tolerance(fixture, "forces") * FORCE_STD


@pytest.mark.slow
def test_standalone_package_runs_with_only_the_library_beside_it(aoti_package, checkpoint, tmp_path):
    """What a C++ host does (load the operator's library, then the package), in a process
    that imports nothing of escn_train: the package needs no Python operator."""
    if not aoti_package.parent.name.startswith("aoti_standalone"):
        pytest.skip("the default package calls the Python-registered operators")
    potential_module, info = load_checkpoint_potential(checkpoint)
    cases = []
    for seed, sizes in enumerate(([1], [3, 11], [2, 7, 4, 16])):
        args = forward_args(sample_structures(sizes, info.max_num_elements, seed=seed + 1), info)
        with torch.no_grad():
            energy, forces = potential_module(*args)
        cases.append({"args": list(args), "energy": energy, "forces": forces})
    torch.save(cases, tmp_path / "cases.pt")
    result = subprocess.run(
        [sys.executable, "-c", HOST_SCRIPT, str(aoti_package), str(native_library_path(aoti_package)),
         str(tmp_path / "cases.pt")], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["escn_train"] == [] and out["cases"] == 3
    assert max(out["worst"].values()) <= 1e-4  # relative to the largest value: float32 round-off


def _with_operators(source_path: Path, target_path: Path, operators) -> None:
    """A copy of an escn-export file whose metadata records ``operators`` instead."""
    with zipfile.ZipFile(source_path) as source, zipfile.ZipFile(target_path, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("wrapper_metadata.json"):  # AOTI package
                meta = json.loads(data)
                meta[METADATA_KEY] = json.dumps({**json.loads(meta[METADATA_KEY]), "operators": operators})
                data = json.dumps(meta).encode()
            elif item.filename.endswith("/extra/" + METADATA_KEY):  # exported program
                data = json.dumps({**json.loads(data), "operators": operators}).encode()
            target.writestr(item, data)


def _operator_records() -> list:
    """Edited operator records and the one-line errors they must give."""
    from escn_train.models.fast.operators import operator_schema

    again = "export it again from its checkpoint with this version's escn-export"
    stage = operator_schema("escn_train::so2_stage")
    old_stage = stage.replace("Tensor[] geometry_tensors", "Tensor[] rows, Tensor source_group_atom")
    assert old_stage != stage
    return [
        ({"escn_train::grid_silu": operator_schema("escn_train::grid_silu"), "other::op": "op(Tensor x) -> Tensor"},
         r"calls operators this escn-train does not provide: other::op; expected only escn_train::grid_silu, "
         r"escn_train::grid_silu_backward, escn_train::first_layer, escn_train::first_layer_backward, "
         r"escn_train::so2_stage, escn_train::so2_stage_backward \(" + again + r"\)$"),
        ({"escn_train::so2_stage": old_stage},
         r"calls escn_train::so2_stage with the signature '.*Tensor\[\] rows, Tensor source_group_atom.*', but "
         r"this escn-train's is '.*Tensor\[\] geometry_tensors.*'; " + again + "$"),
        (["escn_train::grid_silu", "escn_train::first_layer", "escn_train::so2_stage", "escn_train::so2_stage_backward"],
         r"written by an earlier escn-train whose operators escn_train::so2_stage, escn_train::so2_stage_backward "
         r"had other signatures; " + again + "$"),
    ]


@pytest.mark.slow
def test_aoti_package_calling_unknown_or_changed_operators_is_a_clear_error(aoti_package, tmp_path):
    """Its compiled calls would pass the wrong arguments: refused before it is loaded."""
    document = json.loads(aoti_package_metadata(aoti_package)[METADATA_KEY])
    if not document["operators"]:
        pytest.skip("a standalone package calls no operator")
    edited = tmp_path / "escn.aoti.pt2"
    for operators, message in _operator_records():
        _with_operators(aoti_package, edited, operators)
        with pytest.raises(ValueError, match=r"escn\.aoti\.pt2: " + message):
            load_predictor(edited, "cpu", trusted=True)
    # Names only, of operators whose signatures have not changed since: loads and runs.
    _with_operators(aoti_package, edited, ["escn_train::grid_silu", "escn_train::grid_silu_backward"])
    energy, forces = load_predictor(edited, "cpu", trusted=True).predict(_atoms_batch([bulk("Cu")]))
    assert energy.shape == (1,) and torch.isfinite(forces).all()


def test_exported_program_calling_unknown_or_changed_operators_is_a_clear_error(checkpoint, tmp_path):
    assert main([str(checkpoint), "-o", str(tmp_path / "escn"), "--format", "export", "--device", "cpu",
                 "--no-check"]) == 0
    edited = tmp_path / "edited.pt2"
    for operators, message in _operator_records():
        _with_operators(tmp_path / "escn.pt2", edited, operators)
        with pytest.raises(ValueError, match=r"edited\.pt2: " + message):
            load_predictor(edited, "cpu", trusted=True)


@pytest.mark.slow
def test_aoti_package_on_an_unavailable_device_is_a_clear_error(aoti_package):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to request an unavailable device")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        load_predictor(aoti_package, "cuda", trusted=True)
