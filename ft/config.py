"""The job config: typed sections loaded from a YAML file plus command-line overrides.

A config is a :class:`Config` made of five sections (``model``, ``data``, ``train``,
``fsdp``, ``wandb``). Each field is documented by the string literal that follows it
(torchtitan's convention); :func:`field_docs` reads those strings back so that the
Markdown reference (:func:`config_reference_markdown`) and the code cannot drift apart.

Loading (:func:`load_config`) happens in three steps:

1. the YAML file, whose top level maps section names to mappings of fields; any section
   or field left out keeps its default;
2. the overrides, ``section.key=value`` strings applied in order (the last one wins);
3. validation of choices, numeric ranges and cross-field constraints.

Values are checked against each field's type rather than silently converted:

* ``bool`` fields take YAML booleans only (``true``/``false``, also ``yes``/``no``/``on``/``off``);
* ``int`` fields take integers (a quoted ``"100"`` too), never floats or booleans;
* ``float`` fields take ints and floats, and strings such as ``2e-5`` that PyYAML's
  YAML 1.1 resolver leaves as strings because they lack a decimal point;
* ``str`` fields from the YAML file must be strings: ``mode: off`` loads as the boolean
  ``false`` and is refused with a hint to quote it. From an override the text after
  ``=`` is taken verbatim, so ``wandb.mode=offline`` and ``wandb.run_name=2024`` are
  strings and ``model.path=`` is the empty string.

Relative paths (``model.path``, ``data.train_file``, ``data.eval_file``,
``train.output_dir``) are kept exactly as written and resolve against the working
directory of the process that reads them; ``launch.sh`` runs from the repository root,
so paths in ``configs/*.yaml`` are written relative to it.

``python -m ft.config --reference`` prints the Markdown reference;
``python -m ft.config [CONFIG] [section.key=value ...]`` prints the resolved config.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import math
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

__all__ = [
    "CHOICES",
    "SECTIONS",
    "Config",
    "ConfigError",
    "DataConfig",
    "FSDPConfig",
    "ModelConfig",
    "TrainConfig",
    "WandbConfig",
    "config_reference_markdown",
    "config_to_dict",
    "config_to_yaml",
    "field_docs",
    "load_config",
    "save_config",
    "validate_config",
]


class ConfigError(ValueError):
    """A config file or override that names an unknown key or holds an invalid value."""


@dataclass
class ModelConfig:
    """The checkpoint to fine-tune and how its attention is computed."""

    path: str = "runs/tiny-qwen2.5-vl"
    """Local directory holding a Hugging Face-format Qwen2.5-VL checkpoint (config.json,
    safetensors weights, tokenizer and processor files), e.g. a downloaded
    Qwen2.5-VL-7B-Instruct. Nothing is fetched from the Hub. A relative path resolves
    against the working directory."""

    build_tiny_if_missing: bool = False
    """When `path` does not exist, build a tiny randomly initialised Qwen2.5-VL there
    (for demos and tests) instead of failing. Leave false for real checkpoints so that a
    typo in `path` is an error rather than a silent fine-tune of a random model."""

    tiny_vocab: str = "real"
    """Vocabulary of the tiny model made by `build_tiny_if_missing`: `real` uses the full
    Qwen2.5-VL tokenizer (~151k tokens, so the embedding dominates the tiny model's size);
    `small` uses a reduced vocabulary, making the model much smaller and faster. Ignored
    when `path` already exists."""

    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: `sdpa` (PyTorch scaled-dot-product
    attention, works everywhere), `eager` (plain matmuls, slowest, for debugging), or
    `flash_attention_2` (needs the flash-attn package and a CUDA GPU)."""


@dataclass
class DataConfig:
    """Training and evaluation data, and how samples are sized."""

    train_file: str = "data/demo/train.jsonl"
    """JSONL file of training conversations, one sample per line (format: see the
    README). A relative path resolves against the working directory."""

    eval_file: str = "data/demo/eval.jsonl"
    """JSONL file of evaluation conversations in the same format as `train_file`. The
    empty string disables evaluation."""

    max_length: int = 2048
    """Maximum tokens per sample, image tokens included. A longer sample is truncated
    after its last image token; a sample whose images alone do not fit is refused. Lower
    `max_pixels` to make images take fewer tokens."""

    min_pixels: int = 3136
    """Lower bound on each image's pixel count (height × width) after the image
    processor's resizing; smaller images are upscaled. Qwen2.5-VL turns every 28×28 pixel
    area into one token, so 3136 = 4 × 28 × 28 means at least 4 tokens per image."""

    max_pixels: int = 200704
    """Upper bound on each image's pixel count after resizing; larger images are
    downscaled, keeping their aspect ratio. The default 200704 = 256 × 28 × 28 caps an
    image at about 256 tokens. Must be at least `min_pixels`."""


@dataclass
class TrainConfig:
    """The optimisation loop: steps, batch sizes, optimizer, schedule, logging, saving."""

    output_dir: str = "runs/demo"
    """Directory for checkpoints, the final model, logs and the resolved config. A
    relative path resolves against the working directory."""

    max_steps: int = 60
    """Number of optimizer steps to train for. Each step consumes
    `per_device_train_batch_size` × `gradient_accumulation_steps` × world size samples;
    the training data is reshuffled and repeated as often as needed."""

    per_device_train_batch_size: int = 1
    """Training samples per micro-batch on each process (GPU, or CPU rank). The global
    batch per optimizer step is `per_device_train_batch_size` ×
    `gradient_accumulation_steps` × world size."""

    per_device_eval_batch_size: int = 1
    """Evaluation samples per batch on each process."""

    gradient_accumulation_steps: int = 1
    """Micro-batches whose gradients are summed before each optimizer step. The loss is
    token-weighted over the whole optimizer step: every target token across all
    micro-batches and ranks counts equally, so accumulating gives the same gradient as
    one larger batch."""

    learning_rate: float = 1e-4
    """Peak learning rate, reached after warmup and then held constant."""

    warmup_ratio: float = 0.0
    """Fraction of `max_steps` over which the learning rate rises linearly from 0 to
    `learning_rate` (ceil(warmup_ratio × max_steps) steps). This is Hugging Face's
    `constant_with_warmup` schedule; note that Hugging Face's plain `constant` schedule
    ignores warmup_ratio, while ft always honours it."""

    max_grad_norm: float = 1.0
    """Clip the global gradient L2 norm (over all parameters and ranks) to this value
    before each optimizer step. 0 disables clipping; the norm is logged either way."""

    weight_decay: float = 0.0
    """Weight decay coefficient passed to the optimizer. Applied to every parameter,
    norms and biases included: with FSDP1 flat parameters (`use_orig_params=false`)
    one flat shard mixes them, so HF's no-decay group for norms and biases cannot be
    formed."""

    logging_steps: int = 1
    """Log training metrics every this many optimizer steps."""

    eval_steps: int = 20
    """Evaluate on `eval_file` every this many optimizer steps, and at the end of
    training. 0 evaluates only at the end. Ignored when `eval_file` is empty."""

    save_steps: int = 20
    """Write a sharded checkpoint (torch.distributed.checkpoint: every rank writes
    its own model and optimizer shards, plus `train_state.json` once all ranks are done)
    to `output_dir/checkpoints/step-N/` every this many optimizer steps. 0 writes none.
    The loop does not resume from them automatically yet; `ft.ckpt.load_checkpoint`
    restores one into a wrapped model and optimizer."""

    seed: int = 42
    """Seed for data shuffling and the random number generators."""

    optim: str = "adafactor"
    """Optimizer: `adafactor` is the reference recipe's (HF `Adafactor(lr,
    scale_parameter=False, relative_step=False)`); `adamw` is torch's AdamW with HF's
    defaults (betas 0.9/0.999, eps 1e-8). Under FSDP1 the optimizer sees each rank's
    flat shard, so Adafactor cannot factor its second moment: it keeps one full-size
    fp32 moment per parameter (AdamW keeps two), and its update clipping is per shard,
    exactly as in the HF Trainer recipe."""

    precision: str = "auto"
    """Compute precision: `bf16` (bfloat16 mixed precision: parameters and activations in
    bf16, sharded master weights and optimizer state in fp32), `fp32`, or `auto` (bf16 on
    GPU, fp32 on CPU, where bf16 matmuls are about 6× slower)."""

    dataloader_num_workers: int = 0
    """Worker processes per rank for loading and preprocessing samples (image decoding
    and resizing). 0 loads in the training process."""


@dataclass
class FSDPConfig:
    """How the model is sharded across processes with PyTorch FSDP."""

    sharding_strategy: str = "FULL_SHARD"
    """What FSDP shards across ranks: `FULL_SHARD` (parameters, gradients and optimizer
    state; least memory), `SHARD_GRAD_OP` (gradients and optimizer state; parameters
    stay gathered between forward and backward, trading memory for less communication),
    `NO_SHARD` (plain data parallelism), `HYBRID_SHARD` (full sharding within a node,
    replication across nodes)."""

    backward_prefetch: str = "BACKWARD_PRE"
    """When FSDP gathers the next layer's parameters during backward: `BACKWARD_PRE`
    (before the current layer's gradient computation; fastest, most memory),
    `BACKWARD_POST` (after it), or `NONE` (no prefetch)."""

    forward_prefetch: bool = False
    """Issue the next layer's all-gather before the current layer's forward computation,
    overlapping communication with compute at the cost of memory."""

    limit_all_gathers: bool = True
    """Allow at most two all-gathers in flight, bounding peak GPU memory when the CPU
    runs ahead of the GPU."""

    sync_module_states: bool = True
    """Make every rank start from rank 0's weights. On GPU FSDP broadcasts them at
    wrapping time; on CPU, where FSDP refuses this flag, ft broadcasts them explicitly
    just before wrapping."""

    use_orig_params: bool = False
    """Expose the original parameters instead of FSDP's flattened ones. Needed when
    parameters within one wrapped module must be treated differently (e.g. some frozen);
    costs some memory and speed."""

    cpu_offload: bool = False
    """Keep sharded parameters and gradients in CPU memory, moving parameters to the GPU
    only when needed; the optimizer step then runs on the CPU. Saves GPU memory at a
    large cost in speed; only meaningful for GPU runs."""

    activation_checkpointing: bool = True
    """Recompute activations during backward instead of storing them, wrapping each
    language-model decoder layer and each vision-encoder block in a non-reentrant
    checkpoint wrapper (applied after FSDP wrapping). Saves a lot of memory for roughly a
    third more compute."""

    reduce_dtype: str = "fp32"
    """Dtype of the gradient reduce-scatter/all-reduce under `bf16` precision: `fp32`
    (exact sums, twice the traffic) or `bf16` (half the traffic, rounding error grows
    with world size). Under `fp32` precision gradients are always reduced in fp32."""


@dataclass
class WandbConfig:
    """Weights & Biases experiment tracking."""

    project: str = "ft"
    """W&B project that runs are logged to."""

    run_name: str = ""
    """W&B run name. The empty string uses the last path component of
    `train.output_dir`."""

    mode: str = "auto"
    """`online` logs to the W&B server; `offline` writes runs locally (to upload later
    with `wandb sync`); `disabled` turns W&B off; `auto` is online when an
    API key is configured (the WANDB_API_KEY environment variable or an api.wandb.ai
    entry in ~/.netrc) and offline otherwise. A WANDB_MODE environment variable takes
    precedence over this setting."""


@dataclass
class Config:
    """A complete ft job configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The checkpoint to fine-tune."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""

    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """FSDP sharding and memory-saving options."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.tiny_vocab": ("real", "small"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "train.optim": ("adafactor", "adamw"),
    "train.precision": ("bf16", "fp32", "auto"),
    "fsdp.sharding_strategy": ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"),
    "fsdp.backward_prefetch": ("BACKWARD_PRE", "BACKWARD_POST", "NONE"),
    "fsdp.reduce_dtype": ("fp32", "bf16"),
    "wandb.mode": ("auto", "online", "offline", "disabled"),
}
"""Allowed values of the string fields that select between alternatives."""

_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.max_length": (lambda v: v >= 16, ">= 16"),
    "data.min_pixels": (lambda v: v > 0, "> 0"),
    "data.max_pixels": (lambda v: v > 0, "> 0"),
    "train.max_steps": (lambda v: v >= 1, ">= 1"),
    "train.per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "train.per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "train.gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "train.learning_rate": (lambda v: v >= 0, ">= 0"),
    "train.warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.max_grad_norm": (lambda v: v >= 0, ">= 0"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.logging_steps": (lambda v: v >= 1, ">= 1"),
    "train.eval_steps": (lambda v: v >= 0, ">= 0"),
    "train.save_steps": (lambda v: v >= 0, ">= 0"),
    "train.dataloader_num_workers": (lambda v: v >= 0, ">= 0"),
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of the dataclass `cls` to its docstring (cleaned, "" if missing).

    Python discards a string literal that follows an annotated assignment, so the docs
    are recovered by parsing the class's source.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {f.name: "" for f in dataclasses.fields(cls)}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _field_types(cls: type) -> dict[str, type]:
    # `from __future__ import annotations` leaves field.type as a string; resolve it.
    return typing.get_type_hints(cls)


def _suggest(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _has_type(value: Any, typ: type) -> bool:
    if typ is float:  # an int is a valid float, as in Python's numeric tower
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:  # bool subclasses int, but `true` is not a step count
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _coerce(value: Any, typ: type, key: str, where: str) -> Any:
    """Return `value` as an instance of `typ`, or raise ConfigError naming key and source."""

    def refuse(hint: str = "") -> typing.NoReturn:
        raise ConfigError(
            f"{where}: {key}: expected {typ.__name__}, got "
            f"{type(value).__name__} {value!r}{hint}"
        )

    if _has_type(value, typ):
        result = value
    elif typ in (int, float) and isinstance(value, str):
        # PyYAML reads '2e-5' (no decimal point) as a string; a quoted "100" is one too.
        try:
            result = typ(value.strip())
        except ValueError:
            refuse()
    elif typ is bool:
        refuse(" (use true or false)")
    elif typ is str and value is None:
        refuse(" (write '' for an empty string)")
    elif typ is str:
        # YAML 1.1 reads unquoted off/no/yes/on as booleans and digits as numbers.
        refuse(" (quote the value in YAML)")
    else:
        refuse()
    if typ is float:
        result = float(result)
        if not math.isfinite(result):
            refuse(" (must be finite)")
    return result


def _set_field(section_obj: Any, section: str, name: str, value: Any, where: str) -> None:
    types = _field_types(type(section_obj))
    key = f"{section}.{name}"
    if name not in types:
        # Match on the bare name: the shared "section." prefix would make any key look close.
        close = difflib.get_close_matches(name, list(types), n=1)
        hint = f"; did you mean '{section}.{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    setattr(section_obj, name, _coerce(value, types[name], key, where))


def _unknown_section(section: str, where: str) -> ConfigError:
    return ConfigError(
        f"{where}: unknown section {section!r} (sections: {', '.join(SECTIONS)})"
        + _suggest(section, SECTIONS)
    )


def _apply_mapping(cfg: Config, data: Any, where: str, sources: dict[str, str]) -> None:
    if data is None:  # an empty file
        return
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: the top level must be a mapping of sections "
            f"({', '.join(SECTIONS)}), got {type(data).__name__}"
        )
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown_section(str(section), where)
        if values is None:  # `train:` with nothing under it
            continue
        if not isinstance(values, dict):
            raise ConfigError(
                f"{where}: section {section!r} must be a mapping of keys to values, "
                f"got {type(values).__name__} {values!r}"
            )
        for name, value in values.items():
            _set_field(getattr(cfg, section), section, str(name), value, where)
            sources[f"{section}.{name}"] = where


def _apply_override(cfg: Config, override: str, sources: dict[str, str]) -> None:
    where = f"override {override!r}"
    key, eq, text = override.partition("=")
    key = key.strip()
    if not eq:
        raise ConfigError(f"{where}: expected section.key=value (no '=' found)")
    section, dot, name = key.partition(".")
    if not dot or not section or not name or "." in name:
        raise ConfigError(
            f"{where}: expected section.key=value with exactly one dot in the key, "
            f"e.g. train.learning_rate=2e-5"
        )
    if section not in SECTIONS:
        raise _unknown_section(section, where)
    section_obj = getattr(cfg, section)
    field_type = _field_types(type(section_obj)).get(name)
    # String fields take the text verbatim: YAML would turn `mode=off` into False and
    # `run_name=2024` into an int, and `path=` into None.
    if field_type is str:
        value: Any = text
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text  # left for _coerce to refuse with the expected type
    _set_field(section_obj, section, name, value, where)
    sources[key] = where


def _validate(cfg: Config, sources: dict[str, str]) -> None:
    def value_of(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    def where(key: str) -> str:
        return sources.get(key, "default")

    for section, cls in SECTIONS.items():
        section_obj = getattr(cfg, section)
        if not isinstance(section_obj, cls):
            raise ConfigError(f"section {section!r} must be a {cls.__name__}")
        for name, typ in _field_types(cls).items():
            key = f"{section}.{name}"
            # Catches dataclasses built in code; loaded values were coerced already.
            value = getattr(section_obj, name)
            if not _has_type(value, typ):
                raise ConfigError(
                    f"{where(key)}: {key}: expected {typ.__name__}, got "
                    f"{type(value).__name__} {value!r}"
                )
    for key, allowed in CHOICES.items():
        value = value_of(key)
        if value not in allowed:
            raise ConfigError(
                f"{where(key)}: {key}: {value!r} is not one of {', '.join(allowed)}"
                + _suggest(value, allowed)
            )
    for key, (ok, description) in _RANGES.items():
        value = value_of(key)
        if not ok(value):
            raise ConfigError(f"{where(key)}: {key}: {value!r} must be {description}")
    if cfg.data.min_pixels > cfg.data.max_pixels:
        raise ConfigError(
            f"data.min_pixels ({cfg.data.min_pixels}, from {where('data.min_pixels')}) "
            f"must be <= data.max_pixels ({cfg.data.max_pixels}, from "
            f"{where('data.max_pixels')})"
        )


def validate_config(cfg: Config) -> None:
    """Check types, choices and ranges of a Config built in code; raise ConfigError."""
    _validate(cfg, {})


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a Config from defaults, the YAML file at `path` (if any), then `overrides`.

    Each override is a ``section.key=value`` string; later overrides win. Raises
    ConfigError for a missing or malformed file, an unknown section or key, a value of
    the wrong type, or a value outside its allowed choices or range.
    """
    cfg = Config()
    sources: dict[str, str] = {}
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{where}: cannot read config file: {e.strerror or e}") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: invalid YAML: {e}") from e
        _apply_mapping(cfg, data, where, sources)
    for override in overrides:
        _apply_override(cfg, override, sources)
    _validate(cfg, sources)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as ``{section: {field: value}}`` in declaration order."""
    return {
        section: {f.name: getattr(getattr(cfg, section), f.name)
                  for f in dataclasses.fields(cls)}
        for section, cls in SECTIONS.items()
    }


def config_to_yaml(cfg: Config) -> str:
    """The config as YAML text that :func:`load_config` reads back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (every field, defaults included) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Resolved ft config: every field, defaults included.\n" + config_to_yaml(cfg),
        encoding="utf-8",
    )


def _markdown_cell(text: str) -> str:
    # A table cell is one line, and `|` would end the cell.
    return " ".join(text.split()).replace("|", "\\|")


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def config_reference_markdown() -> str:
    """A Markdown reference of every section and field: name, type, default and doc."""
    lines = [
        "Every field can be set in the YAML config file under its section, or on the "
        "command line as `section.key=value` (e.g. `train.learning_rate=2e-5`); command-"
        "line overrides win. Relative paths resolve against the working directory.",
    ]
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        types = _field_types(cls)
        default = cls()
        lines += [
            "",
            f"### `{section}`",
            "",
            inspect.cleandoc(cls.__doc__ or ""),
            "",
            "| Key | Type | Default | Description |",
            "| --- | --- | --- | --- |",
        ]
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            lines.append(
                f"| `{key}` | {types[f.name].__name__} | "
                f"`{_yaml_scalar(getattr(default, f.name))}` | {_markdown_cell(docs[f.name])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: typing.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ft.config",
        description="Print the resolved config (YAML) or the config reference (Markdown). "
        "Arguments containing '=' are section.key=value overrides; the one argument "
        "without '=' (optional) is the YAML config file.",
    )
    parser.add_argument("--reference", action="store_true",
                        help="print the Markdown reference of every config field")
    parser.add_argument("args", nargs="*", metavar="CONFIG | section.key=value")
    ns = parser.parse_args(argv)
    if ns.reference:
        if ns.args:
            parser.error("--reference takes no other arguments")
        sys.stdout.write(config_reference_markdown())
        return 0
    paths = [a for a in ns.args if "=" not in a]
    overrides = [a for a in ns.args if "=" in a]
    if len(paths) > 1:
        parser.error(f"expected at most one config file, got {paths}")
    try:
        cfg = load_config(paths[0] if paths else None, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(config_to_yaml(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
