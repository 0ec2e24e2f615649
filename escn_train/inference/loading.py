"""One entry point for predicting with a trained eSCN, whatever file it comes in.

:func:`load_predictor` opens

* a project checkpoint (``.ckpt`` from training or from ``escn-convert-checkpoint``),
* a fairchem/OCP eSCN checkpoint (converted in memory, see
  :mod:`escn_train.inference.reference_checkpoint`),
* a ``torch.export`` program written by ``escn-export`` (``.pt2``),
* an AOTInductor package written by ``escn-export`` (``.aoti.pt2``),

and returns a :class:`Predictor` whose ``predict(batch)`` builds the radius graph with
:func:`escn_train.graph.radius_graph_pbc` (cutoff and neighbour limit travel with the file)
and returns energies [B] in eV and forces [N, 3] in eV/Å.

The kind of file is read from its content, and its name must agree: exported programs and
AOTInductor packages are named ``*.pt2``, checkpoints anything else. Checkpoints are data
(read with ``torch.load(weights_only=True)``) and safe to load from strangers. Exported
programs and AOTInductor packages are code: they load only with ``trusted=True``, and an
exported program is first checked by :mod:`escn_train.inference.archive_check` (defence in
depth). At module level this imports only ``torch`` and :mod:`escn_train.graph`, so exported
files are usable without the training code (Lightning, Hydra, e3nn); the model code is
imported only for checkpoints.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from escn_train.graph import radius_graph_pbc
from escn_train.inference.archive_check import check_exported_archive

#: Name of the metadata file inside an exported program (``extra_files``) and of the
#: metadata key inside an AOTInductor package (``aot_inductor.metadata``).
METADATA_KEY = "escn_train.json"
FORMAT_NAME = "escn-train-potential"
FORMAT_VERSION = 1
#: Arguments of ``ESCNPotential.forward``, in order.
FORWARD_INPUTS = ("pos", "batch_idx", "natoms", "atomic_numbers", "edge_index", "edge_distance", "edge_distance_vec")

CHECKPOINT, EXPORTED_PROGRAM, AOTI_PACKAGE = "checkpoint", "exported_program", "aoti_package"


# ---------------------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class ModelInfo:
    """What a predictor needs besides the network: its configuration and where it came from."""

    model: dict[str, Any]  # eSCN constructor arguments
    normalizers: dict[str, Any]  # energy_mean, energy_std, force_std, element_references
    kind: str  # CHECKPOINT, EXPORTED_PROGRAM or AOTI_PACKAGE
    source: str  # the file it was loaded from
    weights: str = "raw"  # "ema" or "raw"
    extra: dict[str, Any] = field(default_factory=dict)  # everything else the file recorded

    @property
    def cutoff(self) -> float:
        return float(self.model["cutoff"])

    @property
    def max_neighbors(self) -> int:
        return int(self.model["max_neighbors"])

    @property
    def max_num_elements(self) -> int:
        return int(self.model["max_num_elements"])


def metadata_dict(info: ModelInfo, kind: str, **extra: Any) -> dict[str, Any]:
    """The JSON document stored with exported files (see ``escn-export``)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "artifact": kind,
        "model": dict(info.model),
        "cutoff": info.cutoff,
        "max_neighbors": info.max_neighbors,
        "max_num_elements": info.max_num_elements,
        "normalizers": dict(info.normalizers),
        "weights": info.weights,
        "inputs": list(FORWARD_INPUTS),
        "outputs": ["energy", "forces"],
        "units": {"energy": "eV", "forces": "eV/Å", "pos": "Å"},
        "source": info.source,
        "torch_version": torch.__version__,
        **extra,
    }


def info_from_metadata(text: str, path: str | os.PathLike, kind: str) -> ModelInfo:
    """Parse and check the stored metadata; errors name the file."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: metadata '{METADATA_KEY}' is not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: metadata format_version {meta['format_version']} is newer than this escn-train "
            f"understands ({FORMAT_VERSION}); update escn-train"
        )
    missing = [k for k in ("model", "normalizers") if k not in meta] + [
        k for k in ("cutoff", "max_neighbors", "max_num_elements") if k not in meta.get("model", {})
    ]
    if missing:
        raise ValueError(f"{path}: metadata lacks {missing}")
    known = {"model", "normalizers", "weights"}  # extra keeps e.g. the source checkpoint
    return ModelInfo(
        model=meta["model"],
        normalizers=meta["normalizers"],
        kind=kind,
        source=str(path),
        weights=meta.get("weights", "raw"),
        extra={k: v for k, v in meta.items() if k not in known},
    )


# ---------------------------------------------------------------------------------------- file kinds
def artifact_kind(path: str | os.PathLike) -> str:
    """CHECKPOINT, EXPORTED_PROGRAM or AOTI_PACKAGE, from the file's content."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if not zipfile.is_zipfile(path):
        return CHECKPOINT  # legacy (pre-zip) torch.save files; torch.load decides
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any("/data/aotinductor/" in n for n in names):
        return AOTI_PACKAGE
    if any("/models/" in n for n in names) and any(n.endswith("/archive_format") for n in names):
        return EXPORTED_PROGRAM
    if any(n.endswith("/data.pkl") for n in names):
        return CHECKPOINT
    raise ValueError(
        f"{path}: not a checkpoint, torch.export program or AOTInductor package "
        f"(zip archive holding {sorted(names)[:8]}{' ...' if len(names) > 8 else ''})"
    )


EXPORTED_SUFFIX = ".pt2"
KIND_NAMES = {CHECKPOINT: "a checkpoint", EXPORTED_PROGRAM: "a torch.export program", AOTI_PACKAGE: "an AOTInductor package"}


class TrustRequiredError(ValueError):
    """A model file that runs code when loaded, loaded without saying it is trusted."""


def check_model_file(path: str | os.PathLike, kind: str, trusted: bool) -> None:
    """Refuse a file whose name does not match its content, and code (exported programs,
    AOTInductor packages) unless ``trusted``. One-line errors naming the file and the fix."""
    path = Path(path)
    is_code = kind in (EXPORTED_PROGRAM, AOTI_PACKAGE)
    if is_code and path.suffix != EXPORTED_SUFFIX:
        raise TrustRequiredError(
            f"{path}: the file is {KIND_NAMES[kind]} (code, not data) but its name does not end in "
            f"{EXPORTED_SUFFIX}; refusing to load it. Exported models must be named *{EXPORTED_SUFFIX} and loaded "
            "with trusted=True / --trust-exported, and only when you trust where they come from"
        )
    if not is_code and path.suffix == EXPORTED_SUFFIX:
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a torch.export program or AOTInductor package (not a zip archive)")
        raise ValueError(
            f"{path}: named like an exported model ({EXPORTED_SUFFIX}) but holds a checkpoint; rename it (e.g. to .ckpt)"
        )
    if is_code and not trusted:
        raise TrustRequiredError(
            f"{path}: {KIND_NAMES[kind][0].upper()}{KIND_NAMES[kind][1:]} is code: loading it can run anything its author put in it. "
            "Load it only if you trust its source, with trusted=True (load_predictor, ESCNCalculator) "
            "or --trust-exported (escn-predict); checkpoints (.ckpt) are data and need no trust"
        )


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU; an unavailable CUDA request is an error."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available (use --device cpu or auto)")
    return device


# ---------------------------------------------------------------------------------------- predictors
class Predictor:
    """Energies and forces of batches of structures, in eV and eV/Å.

    Subclasses implement :meth:`forward` (the exportable ``ESCNPotential.forward``
    signature); :meth:`predict` validates a PyG batch and builds its graph first.
    """

    def __init__(self, info: ModelInfo, device: torch.device) -> None:
        self.info = info
        self.device = device

    @property
    def kind(self) -> str:
        return self.info.kind

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def graph_inputs(self, batch: Any) -> tuple[torch.Tensor, ...]:
        """The forward arguments of a batch (``pos, cell, atomic_numbers, natoms``, optional
        ``batch`` and ``pbc`` [B, 3]; no ``pbc`` means periodic in all directions)."""
        device = self.device
        pos = batch.pos.to(device=device, dtype=torch.float32)
        natoms = torch.as_tensor(batch.natoms).to(device=device, dtype=torch.long).view(-1)
        cell = batch.cell.to(device=device, dtype=torch.float32).view(-1, 3, 3)
        atomic_numbers = batch.atomic_numbers.to(device=device, dtype=torch.long).view(-1)
        batch_idx = getattr(batch, "batch", None)
        if batch_idx is None:
            batch_idx = torch.repeat_interleave(torch.arange(natoms.numel(), device=device), natoms)
        batch_idx = batch_idx.to(device=device, dtype=torch.long)
        self._check(pos, atomic_numbers, natoms)
        pbc = getattr(batch, "pbc", None)
        graph = radius_graph_pbc(pos, cell, natoms, self.info.cutoff, self.info.max_neighbors, pbc)
        return pos, batch_idx, natoms, atomic_numbers, graph.edge_index, graph.edge_distance, graph.edge_distance_vec

    def _check(self, pos: torch.Tensor, atomic_numbers: torch.Tensor, natoms: torch.Tensor) -> None:
        # Exported programs skip the model's eager checks, so they are done here for every kind.
        if int(natoms.sum()) != pos.shape[0] or atomic_numbers.shape[0] != pos.shape[0]:
            raise ValueError(
                f"batch is inconsistent: sum(natoms)={int(natoms.sum())}, pos has {pos.shape[0]} rows, "
                f"atomic_numbers has {atomic_numbers.shape[0]}"
            )
        bad = (atomic_numbers < 1) | (atomic_numbers >= self.info.max_num_elements)
        if bool(bad.any()):
            atom = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"atom {atom} has atomic number {int(atomic_numbers[atom])}; this model ({self.info.source}) "
                f"handles 1..{self.info.max_num_elements - 1}"
            )
        finite = torch.isfinite(pos).all(dim=-1)
        if not bool(finite.all()):
            atom = int((~finite).nonzero()[0, 0])
            raise ValueError(f"atom {atom} has a non-finite position {pos[atom].tolist()}")

    @torch.no_grad()
    def predict(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(energy [B] eV, forces [N, 3] eV/Å)`` on ``self.device``."""
        inputs = self.graph_inputs(batch)
        num_structures, num_atoms = inputs[2].shape[0], inputs[0].shape[0]
        padded = inputs[4].shape[1] == 0
        if padded:  # the network cannot take a graph without edges: add a throw-away dimer
            inputs = _with_padding_dimer(*inputs)
        energy, forces = self.forward(*inputs)
        if padded:
            energy, forces = energy[:num_structures], forces[:num_atoms]
        return energy.float(), forces.float()


def _with_padding_dimer(
    pos: torch.Tensor,
    batch_idx: torch.Tensor,
    natoms: torch.Tensor,
    atomic_numbers: torch.Tensor,
    edge_index: torch.Tensor,
    edge_distance: torch.Tensor,
    edge_distance_vec: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Append an H2 structure (two atoms 1 Å apart, one edge each way). Structures never
    interact, so the others' predictions are unchanged; the caller drops its outputs."""
    n, b = pos.shape[0], natoms.shape[0]
    dev = pos.device
    new_pos = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], device=dev)
    vec = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], device=dev)
    return (
        torch.cat([pos, new_pos]),
        torch.cat([batch_idx, torch.full((2,), b, dtype=torch.long, device=dev)]),
        torch.cat([natoms, torch.tensor([2], dtype=torch.long, device=dev)]),
        torch.cat([atomic_numbers, torch.ones(2, dtype=torch.long, device=dev)]),
        torch.cat([edge_index, torch.tensor([[n, n + 1], [n + 1, n]], dtype=torch.long, device=dev)], dim=1),
        torch.cat([edge_distance, torch.ones(2, device=dev)]),
        torch.cat([edge_distance_vec, vec]),
    )


class EagerPredictor(Predictor):
    """An in-memory ``ESCNPotential`` (from a checkpoint)."""

    def __init__(self, potential: torch.nn.Module, info: ModelInfo, device: torch.device) -> None:
        super().__init__(info, device)
        self.potential = potential.to(device).eval()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.potential(*inputs)


class ExportedProgramPredictor(Predictor):
    """A ``torch.export`` program written by ``escn-export``."""

    def __init__(self, path: str | os.PathLike, device: torch.device) -> None:
        # Read once, check, and hand torch the very bytes that were checked.
        data = Path(path).read_bytes()
        check_exported_archive(data, path)
        from escn_train.models.fast.operators import check_recorded_operators  # registers the operators

        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + METADATA_KEY)]
            text = archive.read(names[0]).decode() if names else ""
        if not text:
            raise ValueError(
                f"{path}: torch.export program without '{METADATA_KEY}': it was not written by escn-export, "
                "so its cutoff and max_neighbors are unknown"
            )
        super().__init__(info_from_metadata(text, path, EXPORTED_PROGRAM), device)
        recorded = json.loads(text).get("operators")
        if recorded is not None:
            check_recorded_operators(recorded, path)
        try:
            program = torch.export.load(io.BytesIO(data))
        except RuntimeError as exc:
            if recorded is not None:
                raise
            # a version that did not record its operators' signatures
            reason = str(exc).strip().splitlines()[0]
            raise ValueError(
                f"{path}: torch.export could not read the program ({reason}); a file written by an earlier "
                "escn-train may call its operators with other signatures: export it again from its checkpoint"
            ) from None
        exported_on = {t.device.type for t in program.state_dict.values() if isinstance(t, torch.Tensor)}
        if exported_on != {device.type}:
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        self.program = program
        self.module = program.module()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(*inputs)


def aoti_package_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata compiled into an AOTInductor package, read without loading its library."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if "/data/aotinductor/" in n and n.endswith("wrapper_metadata.json")]
        if not names:
            raise ValueError(f"{path}: AOTInductor package without a wrapper_metadata.json")
        return json.loads(archive.read(names[0]))


class AOTIPredictor(Predictor):
    """An AOTInductor package written by ``escn-export`` (compiled for one device type)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device) -> None:
        meta = aoti_package_metadata(path)
        if METADATA_KEY not in meta:
            raise ValueError(
                f"{path}: AOTInductor package without '{METADATA_KEY}' metadata: it was not written by "
                "escn-export, so its cutoff and max_neighbors are unknown"
            )
        compiled_for = meta.get("AOTI_DEVICE_KEY", "cpu")
        if device == "auto":
            device = compiled_for
        device = resolve_device(device)
        if device.type != compiled_for:
            raise ValueError(
                f"{path}: AOTInductor package compiled for '{compiled_for}' cannot run on '{device}'; "
                f"export again with escn-export --device {device.type}, or use the .pt2 exported program"
            )
        super().__init__(info_from_metadata(meta[METADATA_KEY], path, AOTI_PACKAGE), device)
        recorded = json.loads(meta[METADATA_KEY]).get("operators")
        from escn_train.models.fast import native_grid  # light: no model code

        if recorded and set(recorded) == {native_grid.OPERATOR}:  # standalone, with the C++ S2-grid operator
            native_grid.check_recorded(recorded, path)
        elif recorded:  # not a standalone package: register the operators it calls, and check their signatures
            from escn_train.models.fast.operators import check_recorded_operators

            check_recorded_operators(recorded, path)
        index = device.index if device.index is not None else -1
        self.runner = torch._inductor.aoti_load_package(str(path), device_index=index)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        energy, forces = self.runner(*inputs)
        return energy, forces


# ---------------------------------------------------------------------------------------- checkpoints
def load_checkpoint_potential(
    path: str | os.PathLike, use_ema: bool = True, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ModelInfo]:
    """``(ESCNPotential in eval mode, ModelInfo)`` from a project or fairchem/OCP checkpoint."""
    from escn_train.inference.reference_checkpoint import convert_checkpoint, is_reference_checkpoint
    from escn_train.models.escn import eSCN
    from escn_train.models.potential import ESCNPotential
    from escn_train.training.checkpoint import EMA_PREFIX, potential_state_dict

    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a checkpoint (a torch.save file holding {type(checkpoint).__name__})")
    if is_reference_checkpoint(checkpoint):
        checkpoint = convert_checkpoint(checkpoint, source=str(path), use_ema=use_ema)
    if "hyper_parameters" not in checkpoint or "model" not in checkpoint.get("hyper_parameters", {}):
        raise ValueError(
            f"{path}: unknown checkpoint layout: top-level keys {sorted(checkpoint)}; expected an escn-train "
            "checkpoint ('hyper_parameters' with 'model', 'state_dict' with 'potential.*') or a fairchem/OCP "
            "eSCN checkpoint ('state_dict', 'config')"
        )
    model_kwargs = dict(checkpoint["hyper_parameters"]["model"])
    model_kwargs.pop("compile", None)  # compiling is a deployment choice, not part of the weights
    model_kwargs["export"] = False
    state = checkpoint.get("state_dict", {})
    try:
        weights = potential_state_dict(checkpoint, use_ema)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc} (state_dict keys start with {sorted({k.split('.')[0] for k in state})})") from exc
    potential = ESCNPotential(eSCN(**model_kwargs))
    try:
        potential.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the stored model configuration: {exc}") from exc
    used_ema = use_ema and any(k.startswith(EMA_PREFIX) for k in state)
    normalizers = {
        "energy_mean": float(potential.energy_mean),
        "energy_std": float(potential.energy_std),
        "force_std": float(potential.force_std),
        "element_references": potential.element_references.tolist(),
    }
    info = ModelInfo(model_kwargs, normalizers, CHECKPOINT, str(path), "ema" if used_ema else "raw")
    return potential.eval(), info


# ---------------------------------------------------------------------------------------- entry point
def load_predictor(
    path: str | os.PathLike, device: str | torch.device = "auto", use_ema: bool = True, trusted: bool = False
) -> Predictor:
    """A :class:`Predictor` for a checkpoint, exported program or AOTInductor package.

    ``use_ema`` applies to checkpoints (EMA weights when the checkpoint has them);
    exported files carry the weights chosen at export time. ``trusted=True`` is required
    for exported programs and AOTInductor packages, which are code (see the module docstring).
    """
    kind = artifact_kind(path)
    check_model_file(path, kind, trusted)
    if kind == AOTI_PACKAGE:
        return AOTIPredictor(path, device)
    device = resolve_device(device)
    if kind == EXPORTED_PROGRAM:
        return ExportedProgramPredictor(path, device)
    potential, info = load_checkpoint_potential(path, use_ema)
    return EagerPredictor(potential, info, device)
