"""Where metrics go: `<output_dir>/metrics.jsonl` (one JSON object per line) and wandb.

Only rank 0 creates a Tracker; the loop calls it nowhere else. wandb never needs the
network unless you ask for it: mode "auto" runs online only when an API key is
configured, and the WANDB_MODE environment variable always wins.
"""

from __future__ import annotations

import json
import netrc
import os


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(configured: str) -> str:
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if configured == "auto":
        return "online" if _has_wandb_key() else "offline"
    return configured


class Tracker:
    def __init__(self, output_dir: str, wandb_cfg, config_dict: dict, run_name: str):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file = open(self.path, "a")
        self.wandb_mode = resolve_wandb_mode(wandb_cfg.mode)
        self._run = None
        if self.wandb_mode != "disabled":
            import wandb

            self._run = wandb.init(
                project=wandb_cfg.project,
                name=run_name,
                config=config_dict,
                dir=output_dir,
                mode=self.wandb_mode,
            )

    def log(self, record: dict) -> None:
        """`record` must hold "step"; everything else is a metric."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._run is not None:
            metrics = {k: v for k, v in record.items() if k != "step"}
            self._run.log(metrics, step=record["step"])

    def close(self) -> None:
        self._file.close()
        if self._run is not None:
            self._run.finish()
