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
    """Rank 0's metrics sink. `resume_step`: the step a resumed run continues from.
    Records after it (logged by the attempt that crashed or was stopped after its last
    checkpoint) are dropped from metrics.jsonl, and the same wandb run continues."""

    def __init__(self, output_dir: str, wandb_cfg, config_dict: dict, run_name: str,
                 resume_step: int | None = None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        kept = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self._file = open(self.path, "w")
        self._file.writelines(kept)
        self._file.flush()
        self.wandb_mode = resolve_wandb_mode(wandb_cfg.mode)
        self._run = None
        if self.wandb_mode != "disabled":
            import wandb

            id_file = os.path.join(output_dir, "wandb_run_id")
            run_id = None
            if resume_step is not None and os.path.isfile(id_file):
                with open(id_file) as f:
                    run_id = f.read().strip() or None
            self._run = wandb.init(
                project=wandb_cfg.project,
                name=run_name,
                config=config_dict,
                dir=output_dir,
                mode=self.wandb_mode,
                id=run_id,
                resume="allow" if run_id else None,
            )
            with open(id_file, "w") as f:
                f.write(self._run.id)

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
