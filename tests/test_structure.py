"""The seams the rest of ft builds on: one module per FSDP backend reads its internals, optimizers are
registered once, unit and checkpointing are separate decisions of the wrap plan, test
faults stay out of the way unless asked for."""

import ast
import os
import re
import subprocess

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
from ft import faults
from ft.config import TrainConfig, field_choices
from ft.dryrun import build_on_meta, estimate_memory
from ft.fsdp_wrap import WrapRule, checkpoint_summary, format_plan, plan_units
from ft.optim import OPTIMIZERS, build_optimizer, spec_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One unit for the whole vision tower (its merger apart: another part), checkpointing
# per vision block and per decoder layer.
TOWER_PLAN = [
    WrapRule("vision_tower", "the whole vision tower"),
    WrapRule("vision_block", "recomputed, not a unit", unit=False, checkpoint=True),
    WrapRule("merger", "merger"),
    WrapRule("decoder_layer", "layer", checkpoint=True),
]


def _tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


def _readers(pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return sorted(f for f in _tracked_files() if f.startswith("ft/") and f.endswith(".py")
                  and regex.search(open(os.path.join(REPO, f)).read()))


def test_fsdp_internals_are_read_in_the_backend_modules():
    assert _readers(r"_shard_param_infos|\._fqns|_param_infos|_flat_param|FlatParameter|FullyShardedDataParallel"
                    r"|_fsdp_wrapped_module|state_dict_type") == ["ft/fsdp1.py"]
    assert _readers(r"fully_shard|FSDPModule|MixedPrecisionPolicy|set_modules_to_") == ["ft/fsdp2.py"]
    # State dicts go through the backend (and ft's Adafactor's own fqn_state_dict).
    assert _readers(r"get_optimizer_state_dict|get_model_state_dict") == ["ft/fsdp1.py", "ft/fsdp2.py"]


def test_no_file_cites_a_document_the_repository_lacks():
    name = "FACTS" + ".md"  # split, or this file would cite it
    citing = [f for f in _tracked_files() if not f.endswith((".png", ".jpg", ".jpeg"))
              and name in open(os.path.join(REPO, f), errors="replace").read()]
    assert citing == []


def test_optimizers_are_registered_once(tiny_model_dir):
    assert tuple(OPTIMIZERS) == field_choices("train.optim")
    model = torch.nn.Linear(4, 3)
    for name, spec in OPTIMIZERS.items():
        opt = build_optimizer(model.parameters(), TrainConfig(optim=name), model=model)
        assert type(opt) is spec.cls and spec_of(opt) is spec
    # The dry run's optimizer figure is the registry's, and they differ by optimizer.
    units = plan_units(build_on_meta(tiny_model_dir))
    figures = {name: estimate_memory(units, 4, name, "bf16").optimizer for name in OPTIMIZERS}
    assert figures == {name: spec.state_bytes(units, 4, "fsdp1") for name, spec in OPTIMIZERS.items()}
    assert len(set(figures.values())) == len(figures)


def test_backends_are_registered_once_and_fsdp2_maps_or_refuses_each_knob():
    from ft import fsdp2
    from ft.backends import BACKENDS
    from ft.config import FSDPConfig
    from ft.config_load import load_config

    assert tuple(BACKENDS) == field_choices("fsdp.backend") and FSDPConfig().backend == "fsdp1"
    assert BACKENDS["fsdp2"].config_refusals(load_config(None, ["fsdp.backend=fsdp2"])) == []
    # Every FSDP1 knob, every value: mapped (and logged) or refused, naming the key.
    for key, values in fsdp2.KNOBS.items():
        for value, what in values.items():
            cfg = load_config(None, ["fsdp.backend=fsdp2", f"fsdp.{key}={str(value).lower()}"
                                     if isinstance(value, bool) else f"fsdp.{key}={value}"])
            refusals = fsdp2.config_refusals(cfg)
            if isinstance(what, fsdp2.Refused):
                assert refusals == [f"fsdp.{key}={value} with fsdp.backend=fsdp2: {what.why}"]
            else:
                assert refusals == [] and f"{key}={value} -> {what.to}" in fsdp2.describe(cfg.fsdp, "bf16")
    (refusal,) = fsdp2.config_refusals(load_config(None, ["fsdp.backend=fsdp2", "train.optim=hf_adafactor"]))
    assert "train.optim=hf_adafactor" in refusal and "got mixed torch.Tensor and DTensor" in refusal


# torchrun's @record on the entry point cannot enable its fault handler under capsys.
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler:UserWarning")
def test_fsdp2_refusal_stops_the_loop_before_it_starts(tmp_path, monkeypatch, capsys):
    """The training entry point (what `python -m ft.loop` runs), in this process: the
    refusal comes before any process group or output exists, so no fresh process is
    needed (launch.sh's refusals in a real job: tests/test_resume.py)."""
    from ft.loop import main as train_main

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit:
        train_main([os.path.join(REPO, "configs/demo.yaml"), "fsdp.backend=fsdp2",
                    "fsdp.cpu_offload=true", f"train.output_dir={tmp_path / 'out'}"])
    stderr = capsys.readouterr().err
    assert exit.value.code == 2, stderr[-3000:]
    assert "ft: config error: fsdp.cpu_offload=True with fsdp.backend=fsdp2: FSDP2's CPUOffloadPolicy" in stderr
    assert not (tmp_path / "out").exists()


def test_unit_and_checkpointing_are_separate_decisions(tiny_model_dir):
    model = build_on_meta(tiny_model_dir)
    units = plan_units(model, TOWER_PLAN)
    assert [u.fqn for u in units] == ["model.visual", "model.visual.merger", "model.language_model.layers.0",
                                      "model.language_model.layers.1", ""]
    tower = units[0]
    assert list(tower.recompute) == ["model.visual.blocks.0", "model.visual.blocks.1"] and not tower.checkpoint
    assert units[2].checkpoint and list(units[2].recompute) == ["model.language_model.layers.0"]
    assert checkpoint_summary(units) == (4, 0)
    line = next(line for line in format_plan(units, 2).splitlines() if line.strip().startswith("model.visual "))
    assert re.search(r"\s2\s+train$", line), line  # two modules recomputed inside the unit


def _wrap_worker(rank, world, port, model_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from ft import dist
    from ft.config import FSDPConfig
    from ft.collate import Collator
    from ft.dataset import ConversationDataset
    from ft.rows import load_rows
    from ft.fsdp_wrap import WRAP_PLAN, wrap_model
    from ft.model import load_model, loss_sum
    from ft.processor import load_processor

    info = dist.init_distributed()
    processor = load_processor(model_dir)
    ds = ConversationDataset(load_rows(os.path.join(REPO, "data/demo/train.jsonl")), processor, 1024)
    batch = Collator(processor)([ds[rank], ds[rank + 2]]).inputs
    results = {}
    for name, rules in (("default", WRAP_PLAN), ("tower", TOWER_PLAN)):
        model = load_model(model_dir, info)
        wrapped = wrap_model(model, plan_units(model, rules), FSDPConfig(), "fp32", info)
        s, n = loss_sum(wrapped, batch)
        (s / n).backward()
        norm = wrapped.clip_grad_norm_(float("inf"))
        ckpt_names = sorted(n for n, m in wrapped.named_modules() if isinstance(m, CheckpointWrapper))
        results[name] = (s.item(), norm.item(), len(ckpt_names))
    if rank == 0:
        torch.save(results, out)
    dist.cleanup()


# slow: 2 gloo ranks are processes of their own (mp.spawn)
@pytest.mark.slow
def test_whole_tower_unit_with_block_checkpointing_trains_the_same(tiny_model_dir, tmp_path):
    out = str(tmp_path / "r.pt")
    mp.spawn(_wrap_worker, args=(2, free_port(), tiny_model_dir, out), nprocs=2, join=True)
    r = torch.load(out)
    assert r["default"][2] == r["tower"][2] == 4  # 2 blocks + 2 layers recomputed either way
    assert r["tower"][0] == pytest.approx(r["default"][0], abs=1e-5)
    assert r["tower"][1] == pytest.approx(r["default"][1], rel=1e-5)


def test_faults_fire_once_and_only_when_asked(monkeypatch):
    monkeypatch.delenv("FT_TEST_FAULT", raising=False)
    assert not faults.fires("crash", 3, 0)
    monkeypatch.setenv("FT_TEST_FAULT", "nan:3:1")
    monkeypatch.setattr(faults, "_fired", set())
    assert not faults.fires("nan", 3, 0) and not faults.fires("nan", 2, 1) and not faults.fires("crash", 3, 1)
    loss = torch.tensor(2.0)
    assert torch.isnan(faults.poison_loss(loss, 3, 1))
    assert faults.poison_loss(loss, 3, 1) is loss  # once
    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not faults.fires("nan", 3, 1)  # never after a restart
    monkeypatch.setenv("FT_TEST_FAULT", "typo:1:0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(ValueError, match="unknown kind 'typo'"):
        faults.fires("nan", 1, 0)


# -------------------------------------------------------------------------------------
# The shape of the package: one-way imports, one definition per name, small modules
# -------------------------------------------------------------------------------------
FT_DIR = os.path.join(REPO, "ft")
COMMAND_LINE_MODULES = ("ft.chat", "ft.predict", "ft.score", "ft.dryrun", "ft.tiny")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 60


def _ft_sources() -> dict[str, str]:
    """{"ft.loop": its source, ...} for every module of the package (ft/__init__.py aside)."""
    return {f"ft.{name[:-3]}": open(os.path.join(FT_DIR, name)).read()
            for name in sorted(os.listdir(FT_DIR)) if name.endswith(".py") and name != "__init__.py"}


def _ft_imports(source: str, modules) -> set[str]:
    """The ft modules a source imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in modules:
                found.add(node.module)
            elif node.module == "ft":  # from ft import ckpt, dist
                found.update(f"ft.{a.name}" for a in node.names if f"ft.{a.name}" in modules)
    return found


def _import_graph() -> dict[str, set[str]]:
    sources = _ft_sources()
    return {name: _ft_imports(src, sources) - {name} for name, src in sources.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per group of modules that import each other (strongly connected)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = []
    for group in groups:  # the shortest way back to its first module, within the group
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in group)
            if start in nxt:
                circles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return circles


def test_ft_imports_run_one_way():
    """No circle in the import graph of ft, counting imports inside functions."""
    circles = _circles(_import_graph())
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_command_line_modules_are_imported_by_no_ft_module():
    importers = sorted(f"{name} imports {target}" for name, targets in _import_graph().items()
                       for target in sorted(targets) if target in COMMAND_LINE_MODULES)
    assert importers == [], "; ".join(importers)


# Imported by every rank only where a run needs them: `datasets` brings pyarrow and pandas,
# 85 MiB of resident memory per rank that a run on JSONL rows has no use for.
LAZY_IMPORTS = ("datasets", "pyarrow", "pandas")


def test_datasets_is_imported_only_where_a_dataset_is_read():
    """No ft module imports `datasets` (or pyarrow, pandas) at module level, outside an
    `if TYPE_CHECKING:` block: a rank training on JSONL never loads them."""
    offenders = []
    for name in sorted(os.listdir(FT_DIR)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(FT_DIR, name)).read())
        for node in tree.body:  # module level only; `if TYPE_CHECKING:` bodies are not run
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"ft/{name}:{node.lineno} imports {m}" for m in modules
                          if m.split(".")[0] in LAZY_IMPORTS]
    assert offenders == [], "; ".join(offenders)


def _top_level_names(source: str) -> set[str]:
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n != "main" and not (n.startswith("__") and n.endswith("__"))}


def _backend_members() -> list[str]:
    """The members of the `Backend` protocol of ft/backends.py (read, not imported)."""
    tree = ast.parse(open(os.path.join(FT_DIR, "backends.py")).read())
    protocol = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Backend"), None)
    return sorted(n.name if isinstance(n, ast.FunctionDef) else n.target.id for n in (protocol.body if protocol else [])
                  if isinstance(n, ast.FunctionDef) or isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))


def test_no_top_level_name_is_defined_in_two_ft_modules():
    """The backend interface aside: ft.fsdp1 and ft.fsdp2 each define all of it."""
    from ft.backends import BACKENDS

    interface = set(_backend_members())
    backends = {m.__name__ for m in BACKENDS.values()}
    homes: dict[str, list[str]] = {}
    for name, source in _ft_sources().items():
        for top in _top_level_names(source):
            if not (name in backends and top in interface):
                homes.setdefault(top, []).append(name)
    twice = {n: h for n, h in sorted(homes.items()) if len(h) > 1}
    assert twice == {}, "; ".join(f"{n} in {', '.join(h)}" for n, h in twice.items())


def test_no_module_over_600_lines_and_no_function_over_60():
    too_long = []
    for name, source in _ft_sources().items():
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == [], "; ".join(too_long)


def test_each_backend_module_satisfies_the_backend_protocol():
    """Every member of `ft.backends.Backend`, with the protocol's parameter names (the
    modules' functions take no `self`)."""
    import inspect

    from ft.backends import BACKENDS, Backend

    members = _backend_members()
    assert "NAME" in members and "wrap" in members and "describe" in members
    for key, module in BACKENDS.items():
        assert module.NAME == key
        for member in members:
            assert hasattr(module, member), f"{module.__name__} lacks {member}"
            if member == "NAME":
                continue
            want = list(inspect.signature(getattr(Backend, member)).parameters)[1:]
            have = list(inspect.signature(getattr(module, member)).parameters)
            assert have == want, f"{module.__name__}.{member}{tuple(have)}: the protocol has {tuple(want)}"


def _family_class_names() -> set[str]:
    """Every class name of the families' transformers modules (modeling, configuration,
    processing, image and video processing), and the names the registry gives."""
    import importlib

    from ft.families import FAMILIES

    names = set()
    for family in FAMILIES.values():
        names.update({family.model, family.inner, family.config, family.processor, family.video_processor,
                      family.image_processor, *family.roles.values()})
        for kind in ("modeling", "configuration", "processing", "video_processing", "image_processing"):
            try:
                module = importlib.import_module(f"transformers.models.{family.package}.{kind}_{family.package}")
            except ImportError:
                continue
            names.update(n for n, v in vars(module).items() if isinstance(v, type) and n.startswith("Qwen"))
    return names


def _code_names(source: str) -> list[tuple[int, str]]:
    """(line, name) of every identifier, imported module and non-docstring string of a
    module: what its code names, its docstrings and comments left out."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, node.module or "")] + [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found += [(node.lineno, word) for word in re.findall(r"[\w.]+", node.value)]
    return found


def test_no_module_but_the_registry_names_a_family_class():
    """The loop, backends, optimizers, checkpoints and tools stay family-free: only
    ft/families.py names a class of a family's transformers modules or imports from
    them (docstrings and comments may mention them)."""
    classes = _family_class_names()
    assert {"Qwen2_5_VLDecoderLayer", "Qwen3VLVisionPatchMerger", "Qwen2VLProcessor"} <= classes
    offenders = [f"{name}:{line} {word}" for name, source in _ft_sources().items() if name != "ft.families"
                 for line, word in _code_names(source)
                 if word in classes or re.match(r"transformers\.models\.qwen", word)]
    assert offenders == [], "; ".join(offenders)


def test_family_registry_matches_the_config_choices():
    from ft.families import FAMILIES

    assert tuple(FAMILIES) == field_choices("model.tiny_family")
