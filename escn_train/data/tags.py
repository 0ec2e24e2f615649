"""Atom tags at conversion: keep ASE's, or derive OC20's (0 sub-surface, 1 surface, 2 adsorbate).

OC20 models and tools read ``tags`` as 0 = sub-surface slab atom (held fixed), 1 = surface
slab atom, 2 = adsorbate. ``ase.build`` writes something else into the same array: the slab's
layer number counted from the top (1 = top layer ... n = bottom layer) and 0 for atoms added
with ``add_adsorbate``, nearly the reverse. Copying them verbatim silently mislabels every atom.

``--tags oc20`` derives the OC20 tags per structure:

* **adsorbate (2)**: when the tags look like ``ase.build`` layer numbers (see
  :func:`looks_like_ase_layer_tags`), the atoms tagged 0; otherwise the atoms whose element
  does not occur among the fixed atoms (e.g. C, O, H on a Pt slab). An adsorbate made only
  of slab elements (O on an oxide whose O atoms are fixed) is seen only in the first case;
* **sub-surface (0)**: the slab atoms held by a ``FixAtoms`` constraint, as OC20 fixes them;
* **surface (1)**: the remaining slab atoms.

A structure without any ``FixAtoms`` cannot be given OC20 tags (its sub-surface atoms are
unknown) and stops the conversion with its name. ``--tags keep`` (the default) copies the
tags and warns when they look like ``ase.build`` layer numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TAG_MODES = ("keep", "oc20")
SUBSURFACE, SURFACE, ADSORBATE = 0, 1, 2


class TagWarning(UserWarning):
    """Tags that look like ``ase.build`` layer numbers are being copied verbatim."""


def surface_heights(atoms: Any) -> np.ndarray:
    """Each atom's height along the slab normal (a × b of the cell; z without a usable cell)."""
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    normal = np.cross(cell[0], cell[1])
    norm = np.linalg.norm(normal)
    normal = normal / norm if norm > 1e-8 else np.array([0.0, 0.0, 1.0])
    return np.asarray(atoms.get_positions()) @ normal


def looks_like_ase_layer_tags(atoms: Any) -> bool:
    """True for ``ase.build`` slab tags: the non-zero tags are 1..n (n ≥ 2 layers), their mean
    height falls from tag 1 (top layer) to tag n, and any tag-0 atom (adsorbate) lies above
    layer 1. OC20 tags (0 bottom, 1 surface, 2 adsorbate) rise in height instead."""
    tags = np.asarray(atoms.get_tags())
    layers = np.unique(tags[tags != 0])
    if len(layers) < 2 or not np.array_equal(layers, np.arange(1, len(layers) + 1)):
        return False
    heights = surface_heights(atoms)
    means = np.array([heights[tags == layer].mean() for layer in layers])
    if not bool(np.all(np.diff(means) < 0)):
        return False
    adsorbate = tags == 0
    return not adsorbate.any() or bool(heights[adsorbate].min() > heights[tags == 1].max() - 0.5)


def fixed_mask(atoms: Any) -> np.ndarray:
    """Atoms held by a ``FixAtoms`` constraint."""
    from ase.constraints import FixAtoms

    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.get_indices()] = True
    return fixed


def oc20_tags(atoms: Any, source: str = "structure") -> np.ndarray:
    """OC20 tags (0 sub-surface, 1 surface, 2 adsorbate) derived as the module docstring says."""
    fixed = fixed_mask(atoms)
    if not fixed.any():
        raise ValueError(
            f"{source}: --tags oc20 needs a FixAtoms constraint on the sub-surface atoms (OC20 fixes them) and this "
            "structure has none; add one, or use --tags keep"
        )
    numbers = np.asarray(atoms.get_atomic_numbers())
    if looks_like_ase_layer_tags(atoms):
        adsorbate = np.asarray(atoms.get_tags()) == 0
    else:
        adsorbate = ~np.isin(numbers, np.unique(numbers[fixed]))
    if bool((adsorbate & fixed).any()):
        atom = int(np.flatnonzero(adsorbate & fixed)[0])
        raise ValueError(f"{source}: atom {atom} is both an adsorbate atom and held by FixAtoms; check the tags")
    tags = np.full(len(atoms), SURFACE, dtype=np.int64)
    tags[fixed] = SUBSURFACE
    tags[adsorbate] = ADSORBATE
    return tags


def structure_tags(atoms: Any, mode: str = "keep", source: str = "structure") -> np.ndarray:
    """The tags to store: ASE's (``keep``) or OC20's (``oc20``)."""
    if mode == "keep":
        return np.asarray(atoms.get_tags(), dtype=np.int64)
    if mode == "oc20":
        return oc20_tags(atoms, source)
    raise ValueError(f"--tags: unknown mode {mode!r}; choose from {', '.join(TAG_MODES)}")


def layer_tag_warning(count: int, total: int, example: str) -> str:
    """The warning for ``--tags keep`` when tags look like ``ase.build`` layer numbers."""
    return (
        f"{count} of {total} structures (first: {example}) have tags that look like ase.build layer numbers "
        "(1 = top layer ... n = bottom, 0 = adsorbate), not OC20's 0 sub-surface / 1 surface / 2 adsorbate; "
        "they are copied as they are (--tags keep). Use --tags oc20 to derive OC20 tags from the FixAtoms "
        "constraint and the adsorbate atoms"
    )
