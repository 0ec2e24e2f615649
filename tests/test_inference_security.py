"""Exported models are code: trust, names that match the content, and the archive check.

The evil files are made here from a real escn-export program by rewriting one string of
its ``models/model.json``; a subprocess first shows that plain ``torch.export.load`` does
run them (so the refusals below are not vacuous), then every public entry point must refuse
them, naming the file, without the marker file appearing.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import sympy
import torch
from reference_fixtures import build_model, load_fixture

from escn_train.ase import ESCNCalculator
from escn_train.inference.archive_check import (
    UnsafeModelError,
    _Refused,
    check_guard,
    check_sympy_expression,
)
from escn_train.inference.export import main as export_main
from escn_train.inference.loading import TrustRequiredError, load_predictor
from escn_train.inference.reference_checkpoint import potential_checkpoint
from escn_train.models.potential import ESCNPotential
from escn_train.predict import main as predict_main

NAME = "tiny_l2m1"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """``(checkpoint, program)``: a tiny model and its escn-export program."""
    folder = tmp_path_factory.mktemp("secure")
    potential = ESCNPotential(build_model(NAME), -0.75, 2.5, 1.9, torch.zeros(90)).eval()
    checkpoint = folder / "tiny.ckpt"
    torch.save(potential_checkpoint(potential, load_fixture(NAME)["config"]), checkpoint)
    assert export_main([str(checkpoint), "-o", str(folder / "tiny"), "--format", "export", "--device", "cpu",
                        "--no-check"]) == 0
    return checkpoint, folder / "tiny.pt2"


def rewrite(source: Path, target: Path, edit_program=None, replace: dict[str, bytes] | None = None,
            add: dict[str, bytes] | None = None) -> Path:
    """A copy of the archive with ``models/model.json`` edited and entries replaced or added."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = zin.read(info.filename)
            rest = info.filename[len(prefix) + 1:]
            if rest == "models/model.json" and edit_program is not None:
                data = json.dumps(edit_program(json.loads(data))).encode()
            if replace and rest in replace:
                data = replace[rest]
            zout.writestr(info.filename, data)
        for rest, data in (add or {}).items():
            zout.writestr(f"{prefix}/{rest}", data)
    return target


def shell(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def evil_expression(program: dict, marker: Path) -> dict:
    """Replace the first symbolic size by a call of os.system."""
    for value in program["graph_module"]["graph"]["tensor_values"].values():
        for size in value["sizes"]:
            if "as_expr" in size:
                size["as_expr"]["expr_str"] = shell(marker)
                return program
    raise AssertionError("the exported program has no symbolic size")


def evil_guard(program: dict, marker: Path) -> dict:
    program["guards_code"] = program["guards_code"] + [f"{shell(marker)} == 0 or True"]
    return program


def evil_string(program: dict, marker: Path) -> dict:
    """A string argument that would close the quotes of a generated guard."""
    text = json.dumps(program).replace('"abc,pb->apc"', json.dumps(f"x' == 'x' or {shell(marker)} or '"), 1)
    assert text != json.dumps(program)
    return json.loads(text)


def evil_target(program: dict, marker: Path) -> dict:
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
    return program


@pytest.fixture(scope="module")
def evil_files(exported, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """``kind -> (file, marker it would create)``."""
    _, program = exported
    folder = tmp_path_factory.mktemp("evil")
    files = {}
    for kind, edit in (("expr", evil_expression), ("guard", evil_guard), ("target", evil_target),
                       ("string", evil_string)):
        marker = folder / f"marker_{kind}"
        files[kind] = (rewrite(program, folder / f"evil_{kind}.pt2", lambda p, e=edit, m=marker: e(p, m)), marker)
    return files


def test_the_crafted_files_do_run_code_in_plain_torch(evil_files, tmp_path):
    """The oracle: torch.export.load executes the expression, a call of the module the guard
    (with the package's operators registered, as any loader of these programs has them)."""
    script = (
        "import sys, torch\n"
        "import escn_train.models.fast.operators\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        program = torch.export.load(path)\n"
        "        program.module()(*program.example_inputs[0])\n"
        "    except Exception:\n"
        "        pass\n"
    )
    paths = [str(evil_files[k][0]) for k in ("expr", "guard")]
    subprocess.run([sys.executable, "-c", script, *paths], check=True, capture_output=True, timeout=300)
    assert evil_files["expr"][1].exists() and evil_files["guard"][1].exists()
    for kind in ("expr", "guard"):
        evil_files[kind][1].unlink()


def test_legit_program_loads_only_with_trust(exported, tmp_path, capsys):
    checkpoint, program = exported
    for load in (
        lambda: load_predictor(program, "cpu"),
        lambda: ESCNCalculator(program, device="cpu"),
        lambda: ESCNCalculator.from_exported(program, device="cpu"),
    ):
        with pytest.raises(TrustRequiredError, match=rf"^{program}: A torch\.export program is code: .*trusted=True"):
            load()
    assert predict_main([str(program), str(_structures(tmp_path)), "-o", str(tmp_path / "p.npz"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"escn-predict: error: {program}: A torch.export program is code") and "--trust-exported" in err
    assert "\n" not in err

    trusted = load_predictor(program, "cpu", trusted=True)
    eager = load_predictor(checkpoint, "cpu")  # checkpoints are data: no trust needed
    batch = _batch()
    for a, b in zip(trusted.predict(batch), eager.predict(batch)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    out = tmp_path / "trusted.npz"
    assert predict_main([str(program), str(_structures(tmp_path)), "-o", str(out), "--no-progress",
                         "--device", "cpu", "--trust-exported"]) == 0
    assert out.exists()


@pytest.mark.parametrize("kind", ["expr", "guard", "target", "string"])
def test_evil_programs_are_refused_even_when_trusted(evil_files, kind, tmp_path, capsys):
    path, marker = evil_files[kind]
    place = {"expr": "expr_str", "guard": "guards_code", "target": "target", "string": "as_string"}[kind]
    pattern = rf"^{path}: refused model\.json\.\S*{place}\S*: .*not written by escn-export"
    with pytest.raises(UnsafeModelError, match=pattern):
        load_predictor(path, "cpu", trusted=True)
    with pytest.raises(UnsafeModelError, match=pattern):
        ESCNCalculator(path, device="cpu", trusted=True)
    with pytest.raises(UnsafeModelError, match=pattern):
        ESCNCalculator.from_exported(path, device="cpu", trusted=True)
    assert predict_main([str(path), str(_structures(tmp_path)), "-o", str(tmp_path / "p.npz"), "--no-progress",
                         "--trust-exported"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"escn-predict: error: {path}: refused") and "\n" not in err
    assert not marker.exists()


def test_a_program_renamed_to_ckpt_is_refused(evil_files, exported, tmp_path, capsys):
    path, marker = evil_files["expr"]
    disguised = tmp_path / "evil_pt2.ckpt"
    disguised.write_bytes(path.read_bytes())
    legit = tmp_path / "model.ckpt"
    legit.write_bytes(exported[1].read_bytes())
    for candidate in (disguised, legit):
        pattern = rf"^{candidate}: the file is a torch\.export program \(code, not data\) but its name does not end in \.pt2"
        for trusted in (False, True):
            with pytest.raises(TrustRequiredError, match=pattern):
                load_predictor(candidate, "cpu", trusted=trusted)
            with pytest.raises(TrustRequiredError, match=pattern):
                ESCNCalculator(candidate, device="cpu", trusted=trusted)
        assert predict_main([str(candidate), str(_structures(tmp_path)), "-o", str(tmp_path / "p.npz"),
                             "--no-progress", "--trust-exported"]) == 2
        assert f"{candidate}: the file is a torch.export program" in capsys.readouterr().err
    assert not marker.exists()
    checkpoint_as_pt2 = tmp_path / "model.pt2"
    checkpoint_as_pt2.write_bytes(exported[0].read_bytes())
    with pytest.raises(ValueError, match=r"model\.pt2: named like an exported model \(\.pt2\) but holds a checkpoint"):
        load_predictor(checkpoint_as_pt2, "cpu", trusted=True)


class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_payloads_and_foreign_entries_are_refused(exported, tmp_path):
    _, program = exported
    marker = tmp_path / "marker"
    with zipfile.ZipFile(program) as archive:
        weights_config = json.loads(next(archive.read(n) for n in archive.namelist() if n.endswith("_weights_config.json")))
    first = next(iter(weights_config["config"]))
    weights_config["config"][first]["use_pickle"] = True

    buffer = io.BytesIO()
    torch.save((_Boom(marker),), buffer)
    with_kwargs = io.BytesIO()
    torch.save(((torch.ones(1),), {"x'] == 0 or L['y": torch.ones(1)}), with_kwargs)
    cases = {
        "pickled weight": ({"data/weights/model_weights_config.json": json.dumps(weights_config).encode()}, {},
                           r"model_weights_config\.json entry .* is a pickled object"),
        "sample inputs": ({"data/sample_inputs/model.pt": buffer.getvalue()}, {},
                          r"data/sample_inputs/model\.pt needs full pickle to load"),
        "sample inputs with keywords": ({"data/sample_inputs/model.pt": with_kwargs.getvalue()}, {},
                                        r"model\.pt is not a tuple of tensors without keyword arguments"),
        "shared library": ({}, {"data/aotinductor/model/model.so": b"\x7fELF"}, None),
        "legacy weights": ({}, {"data/weights/model.pt": buffer.getvalue()},
                           r"archive entry '.*data/weights/model\.pt' is not part of a torch\.export program"),
        "duplicate entry": ({}, {"models/model.json": b"{}"}, r"lists an entry twice"),
    }
    for name, (replace, add, pattern) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
            path = rewrite(program, tmp_path / f"{name.replace(' ', '_')}.pt2", replace=replace, add=add)
        if pattern is None:  # an AOTInductor-shaped archive: code by nature, needs trust
            with pytest.raises(TrustRequiredError, match=rf"{path.name}: An AOTInductor package is code"):
                load_predictor(path, "cpu")
            continue
        with pytest.raises(UnsafeModelError, match=rf"^{path}: .*{pattern}"):
            load_predictor(path, "cpu", trusted=True)
    assert not marker.exists()


def test_aoti_packages_need_trust_and_a_pt2_name(tmp_path):
    """An AOTInductor package runs its library's constructors on load: refused before that."""
    package = tmp_path / "escn.aoti.pt2"
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("escn/data/aotinductor/model/wrapper_metadata.json", "{}")
        archive.writestr("escn/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(TrustRequiredError, match=rf"^{package}: An AOTInductor package is code"):
        load_predictor(package, "cpu")
    with pytest.raises(TrustRequiredError, match=rf"^{package}: An AOTInductor package is code"):
        ESCNCalculator.from_exported(package, device="cpu")
    renamed = tmp_path / "escn.ckpt"
    renamed.write_bytes(package.read_bytes())
    with pytest.raises(TrustRequiredError, match=r"is an AOTInductor package \(code, not data\) but its name"):
        load_predictor(renamed, "cpu", trusted=True)


# ---------------------------------------------------------------------------------------- grammar
def _torch_expressions() -> list[str]:
    """What torch writes: ``sympy.srepr`` of shape expressions built from its functions."""
    from torch.utils._sympy.functions import CeilToInt, FloorDiv, Max, Min, Mod, ModularIndexing, PythonMod
    from torch.utils._sympy.numbers import int_oo

    s0, s1 = sympy.Symbol("s0", positive=True, integer=True), sympy.Symbol("u1", integer=True)
    exprs = [s0, s0 + 1, 2 * s0 - s1, FloorDiv(s0, 4) + Mod(s0, 3), ModularIndexing(s0, 2, 8), Max(s0, s1, 3),
             Min(s0, 7), PythonMod(s1, 5), CeilToInt(s0 / 3), s0 ** 2, sympy.Eq(s0, 2 * s1), s0 < 9,
             sympy.And(s0 >= 1, sympy.Ne(s1, 0)), sympy.Piecewise((s0, s0 > 2), (1, True)), int_oo, -int_oo,
             sympy.oo, sympy.Rational(1, 2) * s0, sympy.Float(1.5) * s0, sympy.true, sympy.Integer(-12)]
    return [sympy.srepr(e) for e in exprs] + [str(e) for e in exprs[:8]]


def test_grammar_accepts_what_torch_writes():
    for text in _torch_expressions():
        check_sympy_expression(text)
    for guard in ("L['edge_index'].size()[1] == L['edge_distance'].size()[0]", "2 <= L['pos'].size()[0]",
                  "L['x'].size()[0] <= 9223372036854775806", "(L['x'].size()[0] % 2) == 0",
                  "L['x'].stride()[0] == L['x'].size()[1]", "math.floor(L['x'].size()[0] / 2) >= 1",
                  "torch.sym_float(L['x']['y'][0].size()[0]) > 0.5", "not (L['x'].size()[0] == 3)",
                  "max(L['a'].size()[0], 2) == L['b'].size()[0] // 2 and L['a'].storage_offset() == 0"):
        check_guard(guard)


@pytest.mark.parametrize("text", [
    "__import__('os').system('id')", "s0.__class__", "Symbol('s0').subs", "exec('1')", "eval", "open('x')",
    "lambda: 1", "[s0 for s0 in ()]", "s0[0]", "Symbol('__x__')", "Symbol(\"a'); import os\")", "{1: 2}",
    "Integer(1) if s0 else s0", "Pow(Integer(10), Integer(10000000))", "s0 ** 10 ** 9", "1" * 40, "s0 @ s1",
    "Symbol('s0', **{'x': 1})", "Symbol('s0', positive=__import__('os'))", "f'{s0}'", "(s0 := 1)", "s0 +",
    "x" * 20_000, "getattr(s0, 'x')", "Function('f')(s0)", "Lambda(s0, s0)", "S.One",
])
def test_grammar_refuses_anything_else(text):
    with pytest.raises(_Refused):
        check_sympy_expression(text)


@pytest.mark.parametrize("guard", [
    "__import__('os').system('id') == 0", "L['x'].size.__globals__", "L['x'].to('cuda') == 0",
    "L['x'].size()[0] == L['x'].__class__", "os.system('x')", "math.os", "torch.load('x')",
    "L[__import__('os')].size()[0] == 1", "L['x'].size(__import__('os'))[0] == 1", "[1][0] == 1",
    "L['x'].size()[L['y']] == 1", "M['x'].size()[0] == 1", "L['x'] == 1", "exec('1') or True",
])
def test_guard_grammar_refuses_anything_else(guard):
    with pytest.raises(_Refused):
        check_guard(guard)


# ---------------------------------------------------------------------------------------- helpers
def _batch():
    from ase.build import bulk

    from escn_train.data.collate import collate_structures
    from escn_train.data.convert import atoms_to_data

    return collate_structures([atoms_to_data(bulk("Cu", cubic=True), 0, 0, "t", require_labels=False)])


def _structures(folder: Path) -> Path:
    from ase.build import bulk
    from ase.io import write

    path = folder / "inputs.xyz"
    if not path.exists():
        write(path, [bulk("Cu", cubic=True)])
    return path


def test_the_archive_check_allows_every_operator_of_the_fast_stages_and_no_other():
    """The check names the operators itself (it imports no model code): the same list."""
    from escn_train.inference.archive_check import PYTHON_TARGETS
    from escn_train.models.fast.operators import OPERATORS

    ours = {t for t in PYTHON_TARGETS if t.startswith("torch.ops.escn_train.")}
    assert ours == {"torch.ops." + name.replace("::", ".") + ".default" for name in OPERATORS}
