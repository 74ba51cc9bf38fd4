"""train.export_dtype: the dtype of the best/ export (`ckpt.export_hf`), resolved from
the source checkpoint's config.json under `auto`, recorded in the exported config.json,
and an export that reloads with `from_pretrained` (no dtype argument) to the trained
model's logits, tied and untied embeddings alike."""

import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from transformers import Qwen2_5_VLForConditionalGeneration

from conftest import free_port
from ft import ckpt
from ft.config import ConfigError
from ft.config_load import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BF16_U = 2.0 ** -8
"""bfloat16's unit roundoff: 8 significant bits, so rounding to bf16 moves a value by at
most 2^-8 of itself."""


# -------------------------------------------------------------------------------------
# Resolving the setting; the cast itself
# -------------------------------------------------------------------------------------
def _source(tmp_path, name, config):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_auto_follows_the_source_config(tmp_path):
    cases = {
        "v5": ({"dtype": "bfloat16"}, "bfloat16"),
        "v4": ({"torch_dtype": "bfloat16"}, "bfloat16"),  # the released Qwen2.5-VL configs
        "prefixed": ({"torch_dtype": "torch.bfloat16"}, "bfloat16"),
        "fp16": ({"torch_dtype": "float16"}, "float16"),  # kept as the source says
        "fp32": ({"dtype": "float32"}, "float32"),
        "silent": ({}, "float32"),
        "other": ({"dtype": "float8_e4m3fn"}, "float32"),
    }
    for name, (config, expected) in cases.items():
        source = _source(tmp_path, name, config)
        assert ckpt.export_dtype_name("auto", source) == expected, name
        assert ckpt.export_dtype_name("bf16", source) == "bfloat16"
        assert ckpt.export_dtype_name("fp32", source) == "float32"
    assert ckpt.export_dtype_name("auto", str(tmp_path / "missing")) == "float32"
    assert ckpt.export_dtype_name("auto", os.path.join(REPO, "configs/qwen2_5_vl_7b")) == "bfloat16"
    with pytest.raises(ValueError, match="not one of"):
        ckpt.export_dtype_name("fp16", str(tmp_path / "v5"))


def test_config_field():
    assert load_config(None).train.export_dtype == "auto"
    assert load_config(None, ["train.export_dtype=bf16"]).train.export_dtype == "bf16"
    with pytest.raises(ConfigError, match="train.export_dtype.*one of auto, bf16, fp32"):
        load_config(None, ["train.export_dtype=fp16"])


def test_cast_keeps_ties_and_integer_tensors():
    weight = torch.randn(4, 3)
    steps = torch.arange(5)
    sd = {"embed": weight, "lm_head": weight, "other": torch.randn(2), "steps": steps}
    ckpt._cast_floating(sd, torch.bfloat16)
    assert sd["embed"] is sd["lm_head"] and sd["embed"].dtype == torch.bfloat16
    assert torch.equal(sd["embed"], weight.to(torch.bfloat16))
    assert sd["other"].dtype == torch.bfloat16
    assert sd["steps"] is steps  # integer tensors untouched


# -------------------------------------------------------------------------------------
# export_hf on an FSDP-wrapped, trained model (1 gloo process)
# -------------------------------------------------------------------------------------
EXPORTS = [  # (export folder, source config that export_hf reads, setting, expected dtype)
    ("auto-fp32-source", "fp32", "auto", torch.float32),
    ("bf16", "fp32", "bf16", torch.bfloat16),
    ("auto-bf16-source", "bf16", "auto", torch.bfloat16),
    ("fp32-bf16-source", "bf16", "fp32", torch.float32),
]


def _batch(model_dir):
    from ft.collate import Collator
    from ft.dataset import ConversationDataset
    from ft.rows import load_rows
    from ft.processor import load_processor

    processor = load_processor(model_dir)
    ds = ConversationDataset(load_rows(os.path.join(REPO, "data/demo/train.jsonl")), processor, 1024)
    inputs = Collator(processor)([ds[0], ds[1]]).inputs  # an image row and a text row
    return inputs


def _worker(rank, port, models, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from ft import dist
    from ft.config import FSDPConfig
    from ft.fsdp_wrap import plan_units, wrap_model
    from ft.model import load_model, loss_sum

    info = dist.init_distributed()
    logits = {}
    for name, sources in models.items():
        model = load_model(sources["fp32"], info)
        model = wrap_model(model, plan_units(model), FSDPConfig(), "fp32", info)
        batch = _batch(sources["fp32"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        s, n = loss_sum(model, batch)  # one step: the export must not be the source's weights
        (s / n).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            logits[name] = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for folder, source, setting, _ in EXPORTS:
            ckpt.export_hf(model, os.path.join(out_dir, name, folder), sources[source], info,
                           {"step": 1}, export_dtype=setting)
        # The in-memory model is still the fp32 one, with its config as before.
        hf = model.module
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert hf.config.use_cache is False and str(hf.config.dtype).endswith("float32")
    torch.save(logits, os.path.join(out_dir, "logits.pt"))
    dist.cleanup()


def _labelled_copy(model_dir, dest, key):
    """The source folder with config.json saying bfloat16 under `key` (weights untouched:
    export_hf only reads the config and the processor files)."""
    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    config[key] = "bfloat16"
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return str(dest)


def _forward(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


# slow: FSDP needs a process group: one gloo rank in a process of its own (mp.spawn)
@pytest.mark.slow
def test_export_dtype_follows_setting_and_reloads(tiny_model_dir, tiny_model_dir_untied, tmp_path):
    models = {
        # The tied copy says bfloat16 as transformers 5 writes it, the untied one as 4 did.
        "tied": {"fp32": tiny_model_dir, "bf16": _labelled_copy(tiny_model_dir, tmp_path / "src-tied", "dtype")},
        "untied": {"fp32": tiny_model_dir_untied,
                   "bf16": _labelled_copy(tiny_model_dir_untied, tmp_path / "src-untied", "torch_dtype")},
    }
    mp.spawn(_worker, args=(free_port(), models, str(tmp_path)), nprocs=1, join=True)
    trained = torch.load(tmp_path / "logits.pt")
    batch = _batch(tiny_model_dir)
    sizes = {}
    for name, sources in models.items():
        tied = name == "tied"
        reference = trained[name]
        scale = reference.abs().max().item()
        exported = {}
        for folder, _, _, dtype in EXPORTS:
            best = tmp_path / name / folder
            dtype_name = str(dtype).removeprefix("torch.")
            # (1) the tensors on disk and the dtype config.json records
            with safe_open(str(best / "model.safetensors"), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            assert {t.dtype for t in tensors.values()} == {dtype}, (name, folder)
            embed_key = "model.embed_tokens.weight"  # the checkpoint's names, as saved
            # A tied lm_head is not written twice; from_pretrained ties it back (below).
            assert embed_key in tensors and ("lm_head.weight" in tensors) != tied
            config = json.loads((best / "config.json").read_text())
            assert config["dtype"] == dtype_name and config["use_cache"] is True
            for sub in ("text_config", "vision_config"):
                assert config[sub].get("dtype", dtype_name) == dtype_name
            sizes[(name, folder)] = (best / "model.safetensors").stat().st_size
            exported[folder] = tensors

            # (2) from_pretrained without a dtype loads it in that dtype, ties intact,
            # and gives the trained model's logits.
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(best).eval()
            assert {p.dtype for p in model.parameters()} == {dtype}
            embed, lm_head = model.model.language_model.embed_tokens.weight, model.lm_head.weight
            assert (lm_head.data_ptr() == embed.data_ptr()) == tied
            logits = _forward(model, batch)
            if dtype == torch.float32:
                assert (logits - reference).abs().max().item() <= 1e-5, (name, folder)
            else:
                # Served as is (bf16 weights and bf16 compute): every weight, activation
                # and matmul output rounds by up to u = 2^-8 of itself, and in the worst
                # case these add up along the path to a logit: embedding, 2 text layers
                # (norm, q/k/v, attention output, 3 MLP matmuls, 2 residual adds), final
                # norm and lm_head, about 14 roundings in a row. Bound: 16u of the logit
                # scale (max |logit|, ~1 here). Measured: 1.5u tied, 2.9u untied.
                err = (logits - reference).abs().max().item()
                assert err <= 16 * BF16_U * scale, (name, folder, err, scale)
                # The same weights computed in fp32: only the weights' rounding is left,
                # at most u of each weight, and to first order a logit moves by u times
                # the sum of the few weight matrices' contributions along its path, whose
                # signs mostly cancel: bound 4u of the logit scale. Measured: 0.6-0.8u.
                up = Qwen2_5_VLForConditionalGeneration.from_pretrained(best, dtype=torch.float32).eval()
                err_up = (_forward(up, batch) - reference).abs().max().item()
                assert err_up <= 4 * BF16_U * scale, (name, folder, err_up, scale)
        # A bf16 export is exactly the fp32 export rounded to bf16, tensor by tensor.
        fp32 = exported["auto-fp32-source"]
        for folder in ("bf16", "auto-bf16-source"):
            assert exported[folder].keys() == fp32.keys()
            for key, tensor in fp32.items():
                assert torch.equal(exported[folder][key], tensor.to(torch.bfloat16)), (folder, key)
        # Half the bytes of tensor data; the file's JSON header is a few KiB either way.
        data = {folder: sum(t.numel() * t.element_size() for t in exported[folder].values())
                for folder in ("bf16", "auto-fp32-source")}
        assert 2 * data["bf16"] == data["auto-fp32-source"]
        assert sizes[(name, "bf16")] < 0.51 * sizes[(name, "auto-fp32-source")]
