"""escn-convert --tags keep|oc20: OC20 tags derived from FixAtoms and the adsorbate atoms, and a
warning when kept tags look like ase.build layer numbers."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.io import write

from escn_train.data import LmdbDataset
from escn_train.data.convert import main
from escn_train.data.tags import TagWarning, looks_like_ase_layer_tags, oc20_tags, structure_tags


def ase_slab(adsorbate: str = "CO", fix_layers: int = 2) -> Atoms:
    """ase.build's tags: layers 1 (top) .. 4 (bottom), adsorbate 0; the bottom layers fixed."""
    slab = fcc111("Pt", size=(2, 2, 4), vacuum=7.0)
    add_adsorbate(slab, molecule(adsorbate), 2.0, "ontop")
    slab.set_constraint(FixAtoms(mask=slab.get_tags() > 4 - fix_layers))
    slab.calc = SinglePointCalculator(slab, energy=-1.0, forces=np.zeros((len(slab), 3)))
    return slab


def test_ase_layer_tags_become_oc20_tags():
    slab = ase_slab()
    assert looks_like_ase_layer_tags(slab)
    tags = oc20_tags(slab)
    layer = slab.get_tags()
    np.testing.assert_array_equal(tags[layer == 0], 2)       # C and O of CO
    np.testing.assert_array_equal(tags[layer >= 3], 0)       # the two fixed bottom layers
    np.testing.assert_array_equal(tags[(layer == 1) | (layer == 2)], 1)
    np.testing.assert_array_equal(structure_tags(slab, "keep"), layer)


def test_without_layer_tags_adsorbates_are_the_elements_not_in_the_fixed_slab():
    slab = ase_slab("OH")
    slab.set_tags(np.zeros(len(slab), dtype=int))  # e.g. tags lost in a file format
    assert not looks_like_ase_layer_tags(slab)
    tags = oc20_tags(slab)
    symbols = np.array(slab.get_chemical_symbols())
    np.testing.assert_array_equal(tags[symbols != "Pt"], 2)
    assert (tags == 0).sum() == 8 and (tags == 1).sum() == 8


def test_oc20_tags_are_not_mistaken_for_layers_and_need_fixatoms():
    slab = ase_slab()
    oc20 = oc20_tags(slab)
    slab.set_tags(oc20)
    assert not looks_like_ase_layer_tags(slab)  # 0 bottom, 1 surface, 2 adsorbate rise in height
    np.testing.assert_array_equal(oc20_tags(slab), oc20)
    slab.set_constraint()
    with pytest.raises(ValueError, match="frame 3: --tags oc20 needs a FixAtoms constraint"):
        oc20_tags(slab, "frame 3")


def test_command_line_tags_and_warning(tmp_path, capsys):
    frames = [ase_slab(), ase_slab("OH")]
    source = tmp_path / "slabs.traj"
    write(source, frames)
    assert main([str(source), "-o", str(tmp_path / "keep.lmdb"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "escn-convert: warning: 2 of 2 structures" in err and "look like ase.build layer numbers" in err
    assert "--tags oc20" in err
    kept = LmdbDataset(tmp_path / "keep.lmdb")[0]
    np.testing.assert_array_equal(kept.tags.numpy(), frames[0].get_tags())

    assert main([str(source), "-o", str(tmp_path / "oc20.lmdb"), "--tags", "oc20", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    for i, frame in enumerate(frames):
        converted = LmdbDataset(tmp_path / "oc20.lmdb")[i]
        np.testing.assert_array_equal(converted.tags.numpy(), oc20_tags(frame))
        np.testing.assert_array_equal(converted.fixed.numpy() == 1, converted.tags.numpy() == 0)

    loose = ase_slab()
    loose.set_constraint()
    write(tmp_path / "loose.traj", loose)
    assert main([str(tmp_path / "loose.traj"), "-o", str(tmp_path / "x.lmdb"), "--tags", "oc20", "--no-progress"]) == 2
    assert "needs a FixAtoms constraint" in capsys.readouterr().err


def test_tag_warning_from_the_python_api(tmp_path):
    from escn_train.data.convert import convert_files

    write(tmp_path / "one.traj", ase_slab())
    with pytest.warns(TagWarning, match="1 of 1 structures"):
        convert_files([tmp_path / "one.traj"], tmp_path / "out.lmdb", progress=False)
