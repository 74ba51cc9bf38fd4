"""Loading the job config: a YAML file plus command-line overrides, checked against the
schema of ``ft.config``; and writing it back (YAML, the Markdown reference).

Loading (:func:`load_config`) happens in three steps:

1. the YAML file, whose top level maps section names to mappings of fields; any section
   or field left out keeps its default;
2. the overrides, ``section.key=value`` strings applied in order (the last one wins);
3. validation of choices, numeric ranges and cross-field constraints (:func:`_validate`,
   the one gate every entry point goes through: training, the dry run, ``launch.sh``).

Values are checked against each field's type rather than silently converted:

* ``bool`` fields take YAML booleans only (``true``/``false``, also ``yes``/``no``/``on``/``off``);
* ``int`` fields take integers (a quoted ``"100"`` too), never floats or booleans;
* ``float`` fields take ints and floats, and strings such as ``2e-5`` that PyYAML's
  YAML 1.1 resolver leaves as strings because they lack a decimal point;
* fields typed ``Literal["a", "b", ...]`` select between alternatives: they load like
  ``str`` fields, then must be one of the listed strings (``ft.config.CHOICES``);
* ``str`` fields from the YAML file must be strings: ``mode: off`` loads as the boolean
  ``false`` and is refused with a hint to quote it. From an override the text after
  ``=`` is taken verbatim, so ``wandb.mode=offline`` and ``wandb.run_name=2024`` are
  strings and ``model.path=`` is the empty string.

Relative paths (``model.path``, ``data.train_file``, ``data.eval_file``,
``train.output_dir``) are kept exactly as written and resolve against the working
directory of the process that reads them; ``launch.sh`` runs from the repository root,
so paths in ``configs/*.yaml`` are written relative to it.

``python -m ft.config_load --reference`` prints the Markdown reference;
``python -m ft.config_load [CONFIG] [section.key=value ...]`` prints the resolved config
(``launch.sh`` runs it to refuse a bad config before starting any worker).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import math
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from ft.config import (
    CHOICES,
    SECTIONS,
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    field_docs,
    field_types,
    literal_choices,
    ranges,
)
from ft.families import FamilyError, config_family, family_named

__all__ = [
    "HF_ADAFACTOR_CRASH", "builds_tiny_model", "config_reference_markdown", "config_to_dict", "config_to_yaml",
    "load_config", "model_dir_refusal", "model_path_refusal", "refuse_bf16_hf_adafactor", "save_config",
    "validate_config",
]

SourceOf = Callable[[str], str]  # `section.key` -> where its value came from (a file, an override, "default")


# =====================================================================================
# Reading values: each coerced to its field's type, naming the key and where it came from
# =====================================================================================
def _base_type(typ: Any) -> type:
    """The type a value must have before the choice check: str for a Literal of strings."""
    return str if literal_choices(typ) is not None else typ


def _suggest(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_name(typ: Any) -> str:
    return _base_type(typ).__name__


def _has_type(value: Any, typ: Any) -> bool:
    # A Literal field only needs the right type here; _validate checks the choice.
    typ = _base_type(typ)
    if typ is float:  # an int is a valid float, as in Python's numeric tower
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:  # bool subclasses int, but `true` is not a step count
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    """Return `value` as an instance of `typ`, or raise ConfigError naming key and source.

    A Literal field is coerced as its base type (str); whether the value is one of the
    choices is checked later, by _validate, once every override has been applied.
    """
    typ = _base_type(typ)

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
    types = field_types(type(section_obj))
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
    field_type = field_types(type(section_obj)).get(name)
    # String fields take the text verbatim: YAML would turn `mode=off` into False and
    # `run_name=2024` into an int, and `path=` into None.
    if field_type is not None and _base_type(field_type) is str:
        value: Any = text
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text  # left for _coerce to refuse with the expected type
    _set_field(section_obj, section, name, value, where)
    sources[key] = where


# =====================================================================================
# Validation: types, choices and ranges of every field, then each section's cross-field
# rules. The one gate: training, the dry run and launch.sh all load through it.
# =====================================================================================
def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _check_types(cfg: Config, where: SourceOf) -> None:
    for section, cls in SECTIONS.items():
        section_obj = getattr(cfg, section)
        if not isinstance(section_obj, cls):
            raise ConfigError(f"section {section!r} must be a {cls.__name__}")
        for name, typ in field_types(cls).items():
            key = f"{section}.{name}"
            # Catches dataclasses built in code; loaded values were coerced already.
            value = getattr(section_obj, name)
            if not _has_type(value, typ):
                raise ConfigError(
                    f"{where(key)}: {key}: expected {_type_name(typ)}, got "
                    f"{type(value).__name__} {value!r}"
                )


def _check_choices_and_ranges(cfg: Config, where: SourceOf) -> None:
    for key, allowed in CHOICES.items():
        value = _value(cfg, key)
        if value not in allowed:
            raise ConfigError(
                f"{where(key)}: {key}: {value!r} is not one of {', '.join(allowed)}"
                + _suggest(value, allowed)
            )
    for section, cls in SECTIONS.items():
        for name, allowed_range in ranges(cls).items():
            key = f"{section}.{name}"
            value = _value(cfg, key)
            if not allowed_range.ok(value):
                raise ConfigError(f"{where(key)}: {key}: {value!r} must be {allowed_range.text}")


def _data_rules(cfg: Config, where: SourceOf) -> None:
    data = cfg.data
    if data.eval_fraction and data.eval_file:
        raise ConfigError(f"data.eval_fraction ({data.eval_fraction}, from {where('data.eval_fraction')}) "
                          f"carves an eval set out of train_file, but data.eval_file is set too "
                          f"({data.eval_file!r}, from {where('data.eval_file')}): set data.eval_file= (empty) "
                          "or data.eval_fraction=0")
    for low, high in (("data.min_pixels", "data.max_pixels"), ("data.video_min_pixels", "data.video_max_pixels")):
        if _value(cfg, low) > _value(cfg, high):
            raise ConfigError(f"{low} ({_value(cfg, low)}, from {where(low)}) must be <= "
                              f"{high} ({_value(cfg, high)}, from {where(high)})")
    if data.pack_length and data.pack_length < data.max_length:
        raise ConfigError(
            f"data.pack_length ({data.pack_length}, from {where('data.pack_length')}) must be "
            f"0 or at least data.max_length ({data.max_length}, from {where('data.max_length')}): "
            "a sample is never split across packed rows"
        )
    if data.packing and data.group_by_length:
        raise ConfigError(
            f"data.packing (from {where('data.packing')}) and data.group_by_length (from "
            f"{where('data.group_by_length')}) are both true: packing already plans rows by "
            "length; set data.group_by_length=false"
        )


def _default_source(key: str) -> str:
    return "default"


def refuse_bf16_hf_adafactor(train: TrainConfig, where: SourceOf = _default_source) -> None:
    """The one home of the refusal of `train.master_weights=bf16` with
    `train.optim=hf_adafactor` (ConfigError): the validation calls it, and so does
    `ft.optim` before building HF's Adafactor for a config built in code."""
    if train.master_weights == "bf16" and train.optim == "hf_adafactor":
        raise ConfigError(
            f"train.master_weights=bf16 (from {where('train.master_weights')}) with train.optim=hf_adafactor "
            f"(from {where('train.optim')}): HF's Adafactor writes its fp32 result back to bf16 weights "
            "with round-to-nearest, which drops every update smaller than half the bf16 spacing, so "
            "fine-tuning at a small learning rate stops moving weights; use train.optim=adafactor (the "
            "same update, with stochastic rounding) or adamw")


# Measured (torch 2.14, transformers 5.25): HF's Adafactor allocates its row and column
# factors as plain tensors and adds the DTensor gradient's means into them. fsdp2 refuses
# train.optim=hf_adafactor with this text (ft.fsdp2.config_refusals); ft.optim raises it
# if such an optimizer is built on DTensors all the same.
HF_ADAFACTOR_CRASH = (
    "HF's Adafactor crashes in its first step on FSDP2's DTensor parameters (transformers' "
    "optimization.py: exp_avg_sq_row.mul_(beta2t).add_(...): \"aten.add_.Tensor got mixed torch.Tensor "
    "and DTensor\"): use train.optim=adafactor (ft's: the same update, computed per parameter over the "
    "shards) or adamw")


def _model_rules(cfg: Config, where: SourceOf) -> None:
    freeze_keys = ("model.freeze_vision_tower", "model.freeze_merger", "model.freeze_llm")
    if all(_value(cfg, key) for key in freeze_keys):
        raise ConfigError(
            "model.freeze_vision_tower, model.freeze_merger and model.freeze_llm are all "
            f"true (from {', '.join(where(key) for key in freeze_keys)}): nothing would be "
            "trained; set at least one of them to false"
        )


def _validate(cfg: Config, sources: dict[str, str]) -> None:
    def where(key: str) -> str:
        return sources.get(key, "default")

    _check_types(cfg, where)
    _check_choices_and_ranges(cfg, where)
    _data_rules(cfg, where)
    refuse_bf16_hf_adafactor(cfg.train, where)
    _model_rules(cfg, where)


def validate_config(cfg: Config) -> None:
    """Check types, choices and ranges of a Config built in code; raise ConfigError."""
    _validate(cfg, {})


# =====================================================================================
# The model folder: one check for training (`model.path`), ft.chat and ft.predict
# =====================================================================================
def tiny_model_path(family: str) -> str:
    """Where the tiny demo model of `family` (`model.tiny_family`) is built:
    runs/tiny-qwen2.5-vl, runs/tiny-qwen2-vl or runs/tiny-qwen3-vl. `model.path`
    defaults to it."""
    return f"runs/tiny-{family_named(family, 'model.tiny_family').name.lower()}"


def builds_tiny_model(model: ModelConfig) -> bool:
    """Whether `model.path` is where `build_tiny_if_missing` may build the demo model:
    the tiny model's place for `model.tiny_family` (relative to the working directory),
    and only there."""
    return (model.build_tiny_if_missing
            and Path(model.path).resolve() == Path(tiny_model_path(model.tiny_family)).resolve())


def model_dir_refusal(path: str | os.PathLike) -> str | None:
    """Why `path` is not a model folder to load from (it does not exist, is not a folder
    or has no config.json), naming it; None when it is one. Reads the file system."""
    folder = Path(path)
    if not folder.exists():
        problem = "does not exist"
    elif not folder.is_dir():
        problem = "is not a folder"
    elif not (folder / "config.json").is_file():
        problem = "has no config.json"
    else:
        return _family_refusal(folder / "config.json")
    return f"{os.fspath(path)!r} {problem}: expected a folder with a Qwen VL checkpoint (config.json and weights)"


def _family_refusal(config_file: Path) -> str | None:
    """Why the checkpoint of `config_file` is of no family ft trains (its `model_type`,
    read without transformers), or None."""
    try:
        config_family(config_file)
    except FamilyError as e:
        return str(e)
    except (OSError, ValueError) as e:
        return f"{config_file}: cannot be read as a model config: {e}"
    return None


def model_path_refusal(model: ModelConfig) -> str | None:
    """Why `model.path` cannot be trained from (:func:`model_dir_refusal`), or None; the
    demo model's default place is allowed to be missing when it is built there
    (`build_tiny_if_missing`). Reads the file system; creates nothing."""
    if builds_tiny_model(model):
        return None  # the demo model is built there if missing (ft.loop)
    refusal = model_dir_refusal(model.path)
    if refusal is None:
        return None
    hint = (f"; model.build_tiny_if_missing builds the tiny demo model only at its default place, "
            f"{tiny_model_path(model.tiny_family)}" if model.build_tiny_if_missing else "")
    return f"model.path: {refusal}{hint}"


# =====================================================================================
# Loading and writing
# =====================================================================================
def load_config(path: str | Path | None, overrides: typing.Sequence[str] = (),
                check_model: bool = False) -> Config:
    """Build a Config from defaults, the YAML file at `path` (if any), then `overrides`.

    Each override is a ``section.key=value`` string; later overrides win. Raises
    ConfigError for a missing or malformed file, an unknown section or key, a value of
    the wrong type, or a value outside its allowed choices or range. With `check_model`
    (what a training run needs, not printing a config for another machine) also for a
    `model.path` that is not a checkpoint folder (:func:`model_path_refusal`).
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
    if "model.path" not in sources:  # left at its default: the tiny model of model.tiny_family
        cfg.model.path = tiny_model_path(cfg.model.tiny_family)
    refusal = check_model and model_path_refusal(cfg.model)
    if refusal:
        raise ConfigError(f"{sources.get('model.path', 'default')}: {refusal}")
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


# =====================================================================================
# The Markdown reference (from the field docstrings of ft.config), and the command line
# =====================================================================================
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
        types = field_types(cls)
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
            doc = docs[f.name]
            allowed = literal_choices(types[f.name])
            if allowed is not None:
                doc += " One of: " + ", ".join(f"`{value}`" for value in allowed) + "."
            lines.append(
                f"| `{key}` | {_type_name(types[f.name])} | "
                f"`{_yaml_scalar(getattr(default, f.name))}` | {_markdown_cell(doc)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: typing.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ft.config_load",
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
