"""Where a run's metrics go besides its own ``metrics.jsonl`` (always written: resuming reads it): ``--report-to
tensorboard`` and ``wandb`` (offline unless ``WANDB_MODE`` says otherwise). A reporter whose package is missing is
an error before the run starts, never a silent skip."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .errors import UsageError

REPORTERS = ("jsonl", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse(value: Any) -> list[str]:
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value or [])
    names = [n for n in names if n and n != "none"]
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise UsageError(f"unknown --report-to {', '.join(unknown)}; choose from {', '.join(REPORTERS)}")
    for name in names:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UsageError(f"--report-to {name} needs the {package} package: pip install {package}")
    return names


class Reporters:
    """Sends every metrics line (train, eval) to the chosen reporters."""

    def __init__(self, names: list[str], folder: Path, cfg: dict[str, Any]):
        self.writers = []
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.writers.append(("tensorboard", SummaryWriter(str(Path(folder) / "tensorboard"))))
        if "wandb" in names:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            run = wandb.init(dir=str(folder), project="gradspace", name=Path(folder).name, config=cfg, reinit=True)
            self.writers.append(("wandb", run))

    def log(self, line: dict[str, Any]) -> None:
        scalars = {
            f"{line['type']}/{k}": v
            for k, v in line.items()
            if k not in ("step", "type") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for kind, writer in self.writers:
            if kind == "tensorboard":
                for key, value in scalars.items():
                    writer.add_scalar(key, value, line["step"])
            else:
                writer.log(scalars, step=line["step"])

    def close(self) -> None:
        for kind, writer in self.writers:
            writer.close() if kind == "tensorboard" else writer.finish()
        self.writers = []
