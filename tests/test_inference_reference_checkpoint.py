"""escn-convert-checkpoint: fairchem/OCP eSCN checkpoints into escn-train checkpoints.

Test checkpoints are built in the reference's layout from the fixtures' weights (both the
``escn_export`` and the ``escn`` layouts), with synthetic normalisers, ``module.`` prefixes,
old and new kwargs and normaliser keys, and with or without an EMA; converted predictions
must equal the reference outputs × std + mean within the fixtures' frame tolerance.
"""

from __future__ import annotations

import pytest
import torch
from reference_fixtures import fixture_batch, frame_tolerance, load_fixture

from escn_train.inference.loading import load_predictor
from escn_train.inference.reference_checkpoint import (
    ReferenceCheckpointError,
    convert_checkpoint,
    main,
    reference_model_kwargs,
)
from escn_train.models.escn import eSCN

ENERGY_MEAN, ENERGY_STD, FORCE_STD = -0.7554, 2.8873, 1.9


def reference_checkpoint(
    name: str,
    layout: str = "escn_export",
    old_kwargs: bool = False,
    old_normalizers: bool = False,
    prefix: str = "module.",
    trainer_config: bool = False,
    ema_noise: float | None = None,
    elementrefs: torch.Tensor | None = None,
) -> dict:
    """A fairchem-style checkpoint dict with the fixture's weights.

    With ``ema_noise`` the ``state_dict`` holds perturbed weights and ``ema.shadow_params``
    the fixture's weights (trainable parameters in registration order).
    """
    fixture = load_fixture(name)
    config = dict(fixture["config"])
    if old_kwargs:
        config["lmax_list"], config["mmax_list"] = [config.pop("lmax")], [config.pop("mmax")]
    config.update(use_pbc=True, regress_forces=True, otf_graph=True, show_timing_info=False)
    state = dict(fixture["state_dict"] if layout == "escn_export" else fixture["state_dict_main_layout"])
    checkpoint = {
        "config": (
            {"model": layout, "model_attributes": config, "optim": {"lr_initial": 8e-4}}
            if trainer_config
            else {"model": {"name": layout, **config}, "optim": {"lr_initial": 8e-4}}
        ),
        "epoch": 2,
        "step": 1234,
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": None,
        "amp": None,
    }
    if old_normalizers:
        checkpoint["normalizers"] = {
            "target": {"mean": torch.tensor(ENERGY_MEAN), "std": torch.tensor(ENERGY_STD)},
            "grad_target": {"mean": torch.tensor(0.0), "std": torch.tensor(FORCE_STD)},
        }
    else:
        checkpoint["normalizers"] = {
            "energy": {"mean": torch.tensor([ENERGY_MEAN]), "rmsd": torch.tensor([ENERGY_STD])},
            "forces": {"mean": torch.tensor([0.0]), "rmsd": torch.tensor([FORCE_STD])},
        }
    if ema_noise is not None:
        trainable = {n for n, p in eSCN(**fixture["config"]).named_parameters() if p.requires_grad}
        order = [k for k in state if k in trainable]
        generator = torch.Generator().manual_seed(0)
        checkpoint["ema"] = {
            "decay": 0.999,
            "num_updates": 500,
            "shadow_params": [state[k].clone() for k in order],
            "collected_params": [],
        }
        for k in order:
            state[k] = state[k] + ema_noise * torch.randn(state[k].shape, generator=generator)
    if elementrefs is not None:
        checkpoint["elementrefs"] = {"energy": {"element_references": elementrefs}}
    checkpoint["state_dict"] = {prefix + k: v for k, v in state.items()}
    return checkpoint


def assert_matches_reference(predictor, name: str, refs: torch.Tensor | None = None) -> None:
    fixture = load_fixture(name)
    batch = fixture_batch(name)
    energy, forces = (t.cpu() for t in predictor.predict(batch))
    expected_energy = fixture["energy"] * ENERGY_STD + ENERGY_MEAN
    if refs is not None:
        expected_energy = expected_energy + torch.zeros(4).index_add(0, batch.batch, refs[batch.atomic_numbers].float())
    expected_forces = fixture["forces"] * FORCE_STD
    energy_tol = frame_tolerance(fixture, "energy") * ENERGY_STD + 2e-6 * expected_energy.abs().max().item()
    assert (energy - expected_energy).abs().max().item() <= energy_tol
    assert (forces - expected_forces).abs().max().item() <= frame_tolerance(fixture, "forces") * FORCE_STD


@pytest.mark.parametrize(
    "name, options",
    [
        ("tiny_l2m1", dict(layout="escn", old_kwargs=True, old_normalizers=True, prefix="module.module.")),
        ("tiny_l2m1", dict(layout="escn_export", trainer_config=True, prefix="module.module.module.")),
        ("l4m2_sigmoid", dict(layout="escn_export", old_kwargs=True, old_normalizers=True, prefix="")),
        ("l6m3_linsig_rescale", dict(layout="escn_export", prefix="module.")),
    ],
    ids=["escn-old-kwargs-old-norms", "escn_export-trainer-config", "l4m2-old-kwargs", "l6m3-rescale"],
)
def test_converted_checkpoint_reproduces_reference(tmp_path, name, options, device):
    path = tmp_path / "converted.ckpt"
    torch.save(convert_checkpoint(reference_checkpoint(name, **options), source="test"), path)
    assert_matches_reference(load_predictor(path, device), name)


def test_ema_weights_are_used_and_can_be_skipped(tmp_path):
    reference = reference_checkpoint("tiny_l2m1", layout="escn", old_kwargs=True, ema_noise=0.05)
    with_ema, without_ema = tmp_path / "ema.ckpt", tmp_path / "raw.ckpt"
    torch.save(convert_checkpoint(reference, source="test"), with_ema)
    torch.save(convert_checkpoint(reference, source="test", use_ema=False), without_ema)

    predictor = load_predictor(with_ema, "cpu")
    assert predictor.info.weights == "ema"
    assert_matches_reference(predictor, "tiny_l2m1")
    # The same file, raw weights on request; and a file converted without the EMA.
    for raw in (load_predictor(with_ema, "cpu", use_ema=False), load_predictor(without_ema, "cpu")):
        assert raw.info.weights == "raw"
        with pytest.raises(AssertionError):
            assert_matches_reference(raw, "tiny_l2m1")
    state = torch.load(without_ema, weights_only=True)["state_dict"]
    assert not any(k.startswith("ema.") for k in state)


@pytest.mark.parametrize("layout", ["state_dict", "state_dict_main_layout"])
def test_trainable_parameters_are_registered_in_the_reference_order(layout):
    """fairchem's EMA list follows the reference's trainable parameters in registration
    order, i.e. their order among the reference state_dict keys; this eSCN registers them
    in the same order, in both reference layouts."""
    fixture = load_fixture("tiny_l2m1")
    ours = [n for n, p in eSCN(**fixture["config"]).named_parameters() if p.requires_grad]
    assert [k for k in fixture[layout] if k in set(ours)] == ours


def test_shadow_params_in_another_order_are_refused():
    reference = reference_checkpoint("tiny_l2m1", ema_noise=0.0)
    reference["ema"]["shadow_params"] = reference["ema"]["shadow_params"][::-1]
    with pytest.raises(ReferenceCheckpointError, match=r"shadow_params\[0\] has shape"):
        convert_checkpoint(reference, source="test")
    reference["ema"]["shadow_params"] = reference["ema"]["shadow_params"][1:]
    with pytest.raises(ReferenceCheckpointError, match="cannot pair them"):
        convert_checkpoint(reference, source="test")


def test_element_references_are_added_to_energies(tmp_path):
    refs = torch.zeros(91, dtype=torch.float64)
    refs[[1, 6, 8, 29, 47, 78]] = torch.tensor([-3.4, -7.2, -4.9, -3.7, -2.8, -6.1], dtype=torch.float64)
    path = tmp_path / "refs.ckpt"
    torch.save(convert_checkpoint(reference_checkpoint("tiny_l2m1", elementrefs=refs), source="test"), path)
    assert_matches_reference(load_predictor(path, "cpu"), "tiny_l2m1", refs=refs)


def test_predictor_converts_a_fairchem_checkpoint_in_memory(tmp_path):
    path = tmp_path / "fairchem.pt"
    torch.save(reference_checkpoint("tiny_l2m1", layout="escn", old_kwargs=True, old_normalizers=True), path)
    assert_matches_reference(load_predictor(path, "cpu"), "tiny_l2m1")


def test_command_line_writes_a_checkpoint_for_training_and_inference(tmp_path, capsys):
    source, output = tmp_path / "fairchem.pt", tmp_path / "out" / "escn.ckpt"
    torch.save(reference_checkpoint("tiny_l2m1", ema_noise=0.05), source)
    assert main([str(source), "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "EMA weights kept" in printed and "use_pbc" in printed and "optimizer" in printed
    assert main([str(source), "-o", str(output)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err

    from escn_train.training.checkpoint import init_module_from_checkpoint, load_potential, read_checkpoint
    from escn_train.training.module import PotentialModule

    potential = load_potential(output)
    assert float(potential.energy_std) == pytest.approx(ENERGY_STD)
    module = PotentialModule(model=read_checkpoint(output)["hyper_parameters"]["model"])
    init_module_from_checkpoint(module, output)  # what `train.py init_from=...` does
    for key, value in potential.state_dict().items():
        assert torch.equal(module.potential.state_dict()[key], value), key


def test_unsupported_model_arguments_are_named():
    with pytest.raises(ReferenceCheckpointError, match="lmax_list"):
        reference_model_kwargs("escn", {"lmax_list": [4, 6], "mmax_list": [2, 2]})
    with pytest.raises(ReferenceCheckpointError, match="regress_forces"):
        reference_model_kwargs("escn", {"regress_forces": False})
    with pytest.raises(ReferenceCheckpointError, match=r"\['num_heads'\]"):
        reference_model_kwargs("escn_export", {"num_heads": 4, "use_pbc": True})
    kwargs, dropped = reference_model_kwargs("escn", {"lmax_list": [4], "mmax_list": [2], "use_pbc": True})
    assert kwargs["lmax"] == 4 and kwargs["mmax"] == 2 and set(dropped) == {"lmax_list", "mmax_list", "use_pbc"}
    assert kwargs["max_neighbors"] == 40 and kwargs["max_num_elements"] == 90  # the escn class's defaults
    assert reference_model_kwargs("escn_export", {})[0]["max_neighbors"] == 300


def test_bad_checkpoints_give_clear_errors(tmp_path):
    reference = reference_checkpoint("tiny_l2m1")
    reference["normalizers"]["forces"]["mean"] = torch.tensor([0.3])
    with pytest.raises(ReferenceCheckpointError, match="force normaliser mean"):
        convert_checkpoint(reference, source="test")
    reference = reference_checkpoint("tiny_l2m1")
    reference["config"]["model"]["name"] = "gemnet_oc"
    with pytest.raises(ReferenceCheckpointError, match="gemnet_oc"):
        convert_checkpoint(reference, source="test")
    reference = reference_checkpoint("tiny_l2m1")
    reference["config"]["model"]["num_layers"] = 3  # weights for 2 layers
    with pytest.raises(ReferenceCheckpointError, match="does not fit"):
        convert_checkpoint(reference, source="test")

    unknown = tmp_path / "unknown.pt"
    torch.save({"weights": {}, "meta": 1}, unknown)
    with pytest.raises(ValueError, match=r"unknown\.pt: unknown checkpoint layout.*\['meta', 'weights'\]"):
        load_predictor(unknown, "cpu")
    assert main([str(unknown), "-o", str(tmp_path / "x.ckpt")]) == 2
