"""Simulation engines driving escn-train potentials: TorchSim (:mod:`.torchsim`) and LAMMPS (:mod:`.lammps`).

ASE has its calculator in :mod:`escn_train.ase`. Each integration imports its engine only
when used, so the package itself needs neither.
"""
