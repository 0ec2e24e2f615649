#!/usr/bin/env python
"""Train an eSCN potential: `python train.py [group=option ...] [key=value ...]`.

With no arguments: escn_tiny on the demo data on CPU. See `python train.py --help` for the
config groups and README.md (## Training) for recipes, resume and multirun.
"""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def explicit_override_keys() -> list[str]:
    """Dotted keys set on the command line as ``key=value`` (not group choices such as
    ``model=escn_l6_m3``); with ``init_from`` they win over the checkpoint's settings."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return [o.key_or_group for o in overrides if "." in o.key_or_group]


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Resolve the config to plain containers, train, and return the optimised metric."""
    from escn_train.training.config_checks import ConfigError
    from escn_train.training.reliability import CheckpointWriteError
    from escn_train.training.run import run_training

    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise SystemExit(f"invalid configuration: {err}") from None
    config.pop("hydra", None)
    try:
        results = run_training(config, HydraConfig.get().runtime.output_dir, explicit_override_keys())
    except ConfigError as err:
        raise SystemExit(f"invalid configuration: {err}") from None
    except CheckpointWriteError as err:  # disk full etc.: the message names the file; earlier checkpoints are intact
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(str(err)) from None
    except Exception as err:  # bad input data: the message names file, key and problem; no traceback
        from escn_train.data.checks import data_error_message

        message = data_error_message(err)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if ", key b'" in message:
            message += "\n(data.skip_bad_samples=true skips such entries and counts them instead)"
        raise SystemExit(f"data error: {message}") from None
    value = results.get(f"best/{config.get('optimized_metric')}", results.get(str(config.get("optimized_metric"))))
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
