import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from ft.config import (
    CHOICES,
    SECTIONS,
    Config,
    ConfigError,
    TrainConfig,
    choices,
    field_choices,
    field_docs,
)
from ft.config_load import (
    config_reference_markdown,
    config_to_dict,
    load_config,
    main,
    save_config,
    validate_config,
)

REPO = Path(__file__).resolve().parent.parent


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_load():
    assert load_config(None, []) == Config()


def test_yaml_then_overrides(tmp_path):
    path = write_yaml(tmp_path, "train:\n  max_steps: 10\n  seed: 7\nfsdp:\n  cpu_offload: false\n")
    cfg = load_config(path, ["train.max_steps=20", "fsdp.cpu_offload=true"])
    assert cfg.train.max_steps == 20  # override beats file
    assert cfg.train.seed == 7  # file beats default
    assert cfg.fsdp.cpu_offload is True
    assert cfg.train.learning_rate == TrainConfig.learning_rate  # untouched default


def test_later_override_wins():
    cfg = load_config(None, ["train.seed=1", "train.seed=2"])
    assert cfg.train.seed == 2


def test_empty_file_and_empty_section(tmp_path):
    assert load_config(write_yaml(tmp_path, ""), []) == Config()
    assert load_config(write_yaml(tmp_path, "train:\n"), []) == Config()


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.learning_rate=2e-5", "train.learning_rate", 2e-5),  # PyYAML leaves this a str
        ("train.learning_rate=1", "train.learning_rate", 1.0),  # int into a float field
        ("train.max_grad_norm=0.5", "train.max_grad_norm", 0.5),
        ("train.max_steps=100", "train.max_steps", 100),
        ("fsdp.cpu_offload=true", "fsdp.cpu_offload", True),
        ("fsdp.limit_all_gathers=False", "fsdp.limit_all_gathers", False),
        ("model.path=", "model.path", ""),
        ("data.eval_file=", "data.eval_file", ""),
        # String fields take the text verbatim, not YAML's reading of it.
        ("wandb.run_name=2024", "wandb.run_name", "2024"),
        ("wandb.run_name=no", "wandb.run_name", "no"),
        ("model.path=/models/a b=c", "model.path", "/models/a b=c"),
    ],
)
def test_override_coercion(override, key, expected):
    section, name = key.split(".")
    value = getattr(getattr(load_config(None, [override]), section), name)
    assert value == expected
    assert type(value) is type(expected)


def test_yaml_file_coercion(tmp_path):
    path = write_yaml(
        tmp_path,
        "train:\n  learning_rate: 3e-4\n  warmup_ratio: 0\n  max_steps: '100'\n",
    )
    cfg = load_config(path, [])
    assert cfg.train.learning_rate == 3e-4 and type(cfg.train.learning_rate) is float
    assert cfg.train.warmup_ratio == 0.0 and type(cfg.train.warmup_ratio) is float
    assert cfg.train.max_steps == 100 and type(cfg.train.max_steps) is int


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("fsdp.cpu_offload=yes please", ["fsdp.cpu_offload", "'yes please'", "bool"]),
        ("fsdp.cpu_offload=1", ["fsdp.cpu_offload", "1", "bool"]),
        ("train.max_steps=1.5", ["train.max_steps", "1.5", "int"]),
        ("train.max_steps=true", ["train.max_steps", "True", "int"]),
        ("train.max_steps=many", ["train.max_steps", "'many'", "int"]),
        ("train.learning_rate=fast", ["train.learning_rate", "'fast'", "float"]),
        ("train.learning_rate=nan", ["train.learning_rate", "finite"]),
        ("train.learning_rate=[1, 2]", ["train.learning_rate", "float"]),
    ],
)
def test_bad_type_override(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for fragment in fragments:
        assert fragment in str(e.value)


def test_bad_type_in_file_names_file_and_hints_quoting(tmp_path):
    # Unquoted `off` is a YAML 1.1 boolean, not the string "off".
    path = write_yaml(tmp_path, "wandb:\n  project: off\n")
    with pytest.raises(ConfigError, match="quote") as e:
        load_config(path, [])
    assert str(path) in str(e.value) and "wandb.project" in str(e.value)


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*did you mean 'train'"):
        load_config(None, ["trian.max_steps=3"])


def test_unknown_key_suggests():
    expected = r"unknown key 'train.max_stpes'.*did you mean 'train.max_steps'"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["train.max_stpes=3"])


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigError, match="unknown key 'train.zzzz'") as e:
        load_config(None, ["train.zzzz=3"])
    assert "did you mean" not in str(e.value)


def test_unknown_key_in_file_names_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  learning_rte: 1.0e-4\n")
    with pytest.raises(ConfigError, match="did you mean 'train.learning_rate'") as e:
        load_config(path, [])
    assert str(e.value).startswith(f"{path}:")


def test_unknown_section_in_file_names_file(tmp_path):
    path = write_yaml(tmp_path, "fdsp:\n  cpu_offload: true\n")
    with pytest.raises(ConfigError, match="did you mean 'fsdp'") as e:
        load_config(path, [])
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "text, match",
    [
        ("- train\n", "top level must be a mapping"),
        ("train: 5\n", "section 'train' must be a mapping"),
        ("train: [\n", "invalid YAML"),
    ],
)
def test_malformed_file(tmp_path, text, match):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(path, [])
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", [])


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.max_steps", "no '=' found"),
        ("max_steps=3", "exactly one dot"),
        ("train.=3", "exactly one dot"),
        (".max_steps=3", "exactly one dot"),
        ("train.max_steps.x=3", "exactly one dot"),
    ],
)
def test_malformed_override(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_choice_suggests():
    expected = r"train.optim: 'adamW' is not one of adafactor, hf_adafactor, adamw; did you mean 'adamw'"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["train.optim=adamW"])


@pytest.mark.parametrize("key, allowed", sorted(CHOICES.items()))
def test_every_choice_field_is_checked(key, allowed):
    for value in allowed:
        load_config(None, [f"{key}={value}"])
    with pytest.raises(ConfigError, match=key):
        load_config(None, [f"{key}=not-a-choice"])


def literal_fields() -> dict[str, tuple[str, ...]]:
    """Walk the section dataclasses: every Literal-typed field and its arguments."""
    found = {}
    for section, cls in SECTIONS.items():
        for name, typ in typing.get_type_hints(cls).items():
            if typing.get_origin(typ) is typing.Literal:
                found[f"{section}.{name}"] = typing.get_args(typ)
    return found


def test_choices_come_from_literal_types():
    expected = literal_fields()
    assert expected, "no Literal-typed field found"
    assert CHOICES == expected  # one entry per Literal field, and only those
    assert "train.optim" in CHOICES and "wandb.mode" in CHOICES
    assert "train.resume" not in CHOICES  # a plain str field with free-form values
    for key, allowed in expected.items():
        section, name = key.split(".")
        assert choices(section, name) == allowed
        assert choices(SECTIONS[section], name) == allowed
        assert field_choices(key) == allowed
        assert all(isinstance(value, str) for value in allowed)


def test_every_literal_default_is_a_choice():
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        assert getattr(SECTIONS[section](), name) in allowed, key


def test_field_choices():
    assert field_choices("train.optim") == ("adafactor", "hf_adafactor", "adamw")
    assert field_choices("wandb.mode") == ("auto", "online", "offline", "disabled")
    assert choices("train", "max_steps") is None
    for key in ["train.max_steps", "train.nope", "trian.optim", "optim"]:
        with pytest.raises(KeyError):
            field_choices(key)


def test_bad_literal_value_from_override_lists_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.optim=adam"])
    assert str(e.value).startswith(
        "override 'train.optim=adam': train.optim: 'adam' is not one of "
        "adafactor, hf_adafactor, adamw"
    )


def test_bad_literal_value_from_file_lists_choices(tmp_path):
    path = write_yaml(tmp_path, "wandb:\n  mode: offlin\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [])
    assert str(e.value) == (
        f"{path}: wandb.mode: 'offlin' is not one of auto, online, offline, disabled"
        "; did you mean 'offline'?"
    )


def test_literal_field_in_file_must_be_a_string(tmp_path):
    # Unquoted `off` is a YAML 1.1 boolean: refused as for a plain str field.
    path = write_yaml(tmp_path, "wandb:\n  mode: off\n")
    with pytest.raises(ConfigError, match="quote the value in YAML") as e:
        load_config(path, [])
    assert f"{path}: wandb.mode: expected str, got bool False" in str(e.value)


def test_literal_override_is_taken_verbatim():
    # YAML would read `off` as False; the override text is kept as the string "off",
    # which is then refused as a choice (not as a type error).
    with pytest.raises(ConfigError, match=r"wandb.mode: 'off' is not one of"):
        load_config(None, ["wandb.mode=off"])
    assert load_config(None, ["wandb.mode=offline"]).wandb.mode == "offline"


def test_later_override_fixes_a_bad_choice():
    cfg = load_config(None, ["train.optim=adam", "train.optim=adamw"])
    assert cfg.train.optim == "adamw"


def test_validate_config_checks_literal_fields():
    with pytest.raises(ConfigError, match=r"default: train.optim: 'sgd' is not one of"):
        validate_config(Config(train=TrainConfig(optim="sgd")))
    with pytest.raises(ConfigError, match=r"train.optim: expected str, got int 3"):
        validate_config(Config(train=TrainConfig(optim=3)))


def test_bad_choice_in_file_names_file(tmp_path):
    path = write_yaml(tmp_path, "fsdp:\n  sharding_strategy: full_shard\n")
    with pytest.raises(ConfigError, match="FULL_SHARD") as e:
        load_config(path, [])
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "override",
    [
        "train.max_steps=0",
        "train.per_device_train_batch_size=0",
        "train.per_device_eval_batch_size=0",
        "train.gradient_accumulation_steps=0",
        "train.warmup_ratio=1",
        "train.warmup_ratio=-0.1",
        "train.learning_rate=-1e-5",
        "train.max_grad_norm=-1",
        "train.weight_decay=-0.1",
        "train.logging_steps=0",
        "train.eval_steps=-1",
        "train.save_steps=-1",
        "data.max_length=15",
        "data.min_pixels=0",
        "data.max_pixels=0",
        "train.dataloader_num_workers=-1",
    ],
)
def test_out_of_range(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: .* must be"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override",
    [
        "train.max_steps=1",
        "train.warmup_ratio=0.99",
        "train.learning_rate=0",
        "train.max_grad_norm=0",
        "train.eval_steps=0",
        "train.save_steps=0",
        "data.max_length=16",
        "train.dataloader_num_workers=0",
    ],
)
def test_range_boundaries_accepted(override):
    load_config(None, [override])


def test_min_pixels_above_max_pixels():
    with pytest.raises(ConfigError, match="data.min_pixels .* must be <= data.max_pixels"):
        load_config(None, ["data.min_pixels=1000", "data.max_pixels=999"])
    cfg = load_config(None, ["data.min_pixels=1000", "data.max_pixels=1000"])
    assert cfg.data.min_pixels == cfg.data.max_pixels == 1000


def test_validate_config_checks_code_built_configs():
    validate_config(Config())
    with pytest.raises(ConfigError, match="train.max_steps"):
        validate_config(Config(train=TrainConfig(max_steps=0)))
    with pytest.raises(ConfigError, match="expected int"):
        validate_config(Config(train=TrainConfig(seed="42")))


def test_relative_paths_kept_as_given(tmp_path):
    path = write_yaml(tmp_path, "model:\n  path: ckpt/tiny\ntrain:\n  output_dir: ./out\n")
    cfg = load_config(path, [])
    assert cfg.model.path == "ckpt/tiny"
    assert cfg.train.output_dir == "./out"


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        REPO / "configs" / "example_qwen2_5_vl_7b.yaml",
        [
            "wandb.run_name=no",
            "data.eval_file=",
            "train.learning_rate=3e-7",
            "fsdp.cpu_offload=true",
        ],
    )
    saved = tmp_path / "sub" / "config.yaml"
    save_config(cfg, saved)
    assert load_config(saved, []) == cfg
    data = yaml.safe_load(saved.read_text())
    assert list(data) == list(SECTIONS)
    assert list(data["train"]) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert data == config_to_dict(cfg)


def test_every_field_has_a_doc():
    for cls in [Config, *SECTIONS.values()]:
        docs = field_docs(cls)
        assert set(docs) == {f.name for f in dataclasses.fields(cls)}
        for name, doc in docs.items():
            assert doc.strip(), f"{cls.__name__}.{name} has no docstring"


def test_field_docs_belong_to_their_field():
    docs = field_docs(TrainConfig)
    assert "world size" in docs["per_device_train_batch_size"]
    assert "0 disables clipping" in docs["max_grad_norm"]


@pytest.mark.parametrize("key, allowed", sorted(CHOICES.items()))
def test_choice_docs_mention_every_choice(key, allowed):
    section, name = key.split(".")
    doc = field_docs(SECTIONS[section])[name]
    for value in allowed:
        assert f"`{value}`" in doc, f"{key} doc does not mention {value!r}"


def test_reference_mentions_every_field():
    reference = config_reference_markdown()
    for section, cls in SECTIONS.items():
        assert f"### `{section}`" in reference
        for f in dataclasses.fields(cls):
            prefix = f"| `{section}.{f.name}` |"
            row = next(line for line in reference.splitlines() if line.startswith(prefix))
            assert row.count(" | ") == 3, row  # a pipe in a doc would break the table


def test_reference_lists_literal_choices():
    rows = config_reference_markdown().splitlines()
    row = next(line for line in rows if line.startswith("| `train.optim` |"))
    assert row.startswith('| `train.optim` | str | `"adafactor"` | Optimizer.')
    assert row.endswith(" One of: `adafactor`, `hf_adafactor`, `adamw`. |")
    for key, allowed in CHOICES.items():
        row = next(line for line in rows if line.startswith(f"| `{key}` |"))
        listed = ", ".join(f"`{value}`" for value in allowed)
        assert row.endswith(f" One of: {listed}. |"), row
    # Fields without choices get no list.
    row = next(line for line in rows if line.startswith("| `train.resume` |"))
    assert "One of:" not in row


@pytest.mark.parametrize("name", ["demo.yaml", "example_qwen2_5_vl_7b.yaml"])
def test_shipped_configs_load(name):
    path = REPO / "configs" / name
    assert load_config(path, []) != Config()


def test_demo_config_values():
    cfg = load_config(REPO / "configs" / "demo.yaml", [])
    assert cfg.model.build_tiny_if_missing is True
    assert cfg.model.path == "runs/tiny-qwen2.5-vl"
    assert cfg.train.output_dir == "runs/demo"
    assert cfg.train.per_device_train_batch_size == 4
    assert cfg.data.train_file == "data/demo/shapes/train.jsonl"
    assert cfg.wandb.project == "ft-demo"


def test_7b_example_values():
    cfg = load_config(REPO / "configs" / "example_qwen2_5_vl_7b.yaml", [])
    assert cfg.model.build_tiny_if_missing is False
    assert cfg.train.learning_rate == 1e-5
    assert cfg.train.precision == "bf16"
    assert cfg.fsdp.activation_checkpointing is True
    assert cfg.data.max_pixels == 1003520


def test_cli_prints_resolved_yaml(capsys):
    assert main([str(REPO / "configs" / "demo.yaml"), "train.max_steps=5"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["train"]["max_steps"] == 5
    assert data["wandb"]["project"] == "ft-demo"


def test_cli_reports_errors(capsys):
    assert main(["train.max_stpes=5"]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err


# slow: `python -m ft.config --reference`, the command the README tells people to run
@pytest.mark.slow
def test_cli_module_reference():
    result = subprocess.run(
        [sys.executable, "-m", "ft.config_load", "--reference"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    assert result.stdout == config_reference_markdown()


def test_docs_config_reference_is_current():
    """docs/config.md is a fixed header, a marker line, then the generated reference;
    regenerate it with `make docs` when a field or doc changes."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    marker = "<!-- config-reference:start -->\n"
    assert text.count(marker) == 1, "docs/config.md lost its marker line"
    generated = text.split(marker, 1)[1]
    assert generated == config_reference_markdown(), (
        "docs/config.md is out of date: regenerate it with `make docs`"
    )
