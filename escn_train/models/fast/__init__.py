"""The fast formulation of eSCN's message blocks, which eager mode, ``torch.compile``,
``torch.export`` and AOTInductor all run; :mod:`escn_train.models.escn` holds the public
model and the readable reference blocks it is tested against.

One module per stage, in the order a forward pass uses them:

- :mod:`.slots`: edges grouped by atom in a static slot layout (no host synchronisation);
- :mod:`.geometry`: the per-graph constants every layer shares (target-slot layout,
  padded Wigner rows);
- :mod:`.distance`: the Gaussian distance expansion as narrow bands;
- :mod:`.so2`: the SO(2) convolutions, first layer per atom, the rest per edge slot
  (under ``torch.compile``, the custom operator ``escn_train::so2_stage``);
- :mod:`.grid`: the S2-grid SiLU in cache-sized edge blocks, rotated back per atom (the
  custom operator ``escn_train::grid_silu``, so that traced code calls the same kernel),
  with :mod:`.cpu_kernel` (``grid_kernel.c``) fusing each block's products and SiLU on CPUs;
- :mod:`.message`: the entry point that composes them into a message block.
"""
