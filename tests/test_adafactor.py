"""ft's Adafactor: HF Adafactor's update for every original parameter, whatever the
sharding. On plain tensors it is HF bit for bit; under FSDP1 on 2 and 3 gloo ranks (flat
shards cutting matrices mid-row) and under FSDP2 (DTensor dim-0 shards, uneven) it
matches single-process HF to float rounding, where HF's own Adafactor does not; its state is the factored size; its world-size independent
state dict resumes runs, also at another world size."""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ft.adafactor import Adafactor, adafactor_state_bytes
from ft.optim import state_bytes

STEPS, RESUME_AT, HF_STEPS, LR, WD = 5, 3, 3, 1e-2, 0.05
CPU = torch.device("cpu")


# -------------------------------------------------------------------------------------
# A small model with every kind of parameter: odd-sized matrices (so shards cut rows),
# biases and norms (1-D), a Conv1d weight (3-D: HF factors a stack of 13 x 3 matrices),
# and an embedding tied to the output layer.
# -------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Toy(nn.Module):
    def __init__(self, vocab=29, d=13, h=23):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        x = self.emb(tokens)
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _toy(weights=None):
    torch.manual_seed(0)
    model = Toy()
    if weights is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
    return model


def _train_step(model, opt):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 29, (4, 10), generator=gen)
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _clean(name):
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _hf_adafactor(params, lr=LR):
    from transformers.optimization import Adafactor as HF

    return HF(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=WD)


def _reference(steps=STEPS):
    """Single-process HF Adafactor on the unwrapped model."""
    model = _toy()
    opt = _hf_adafactor(model.parameters())
    losses = [_train_step(model, opt) for _ in range(steps)]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, model, opt


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -------------------------------------------------------------------------------------
# One process, plain tensors: HF exactly
# -------------------------------------------------------------------------------------
def test_plain_tensors_are_hf_bit_for_bit():
    ref_losses, ref_weights, ref_model, ref_opt = _reference()
    model = _toy()
    opt = Adafactor(model.parameters(), model, lr=LR, weight_decay=WD)
    losses = [_train_step(model, opt) for _ in range(STEPS)]
    assert losses == ref_losses
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_weights[name]), name

    # The state dict is HF's state under the parameters' names (tied: the first name).
    sd = opt.fqn_state_dict()
    names = dict(ref_model.named_parameters())
    assert {k.rsplit(".", 1)[0] for k in sd} == set(names)
    for name, p in names.items():
        hf = ref_opt.state[p]
        assert sd[f"{name}.step"].item() == hf["step"] == STEPS
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if key in hf:
                assert torch.equal(sd[f"{name}.{key}"], hf[key]), (name, key)
    assert "conv.weight.exp_avg_sq_row" in sd and sd["conv.weight.exp_avg_sq_row"].shape == (13, 13)


def test_checkpoint_api_guards():
    model = _toy()
    opt = Adafactor(model.parameters(), model, lr=LR)
    with pytest.raises(RuntimeError, match="fqn_state_dict"):
        opt.state_dict()
    sd = opt.fqn_state_dict()
    del sd["conv.bias.step"]
    with pytest.raises(KeyError, match="conv.bias.step"):
        opt.load_fqn_state_dict(sd)
    with pytest.raises(ValueError, match="not a parameter of `model`"):
        Adafactor([nn.Parameter(torch.zeros(3))], model, lr=LR)


# -------------------------------------------------------------------------------------
# 2 and 3 gloo ranks. Process start-up is most of the cost, so ONE spawn of 3 processes
# runs everything (the `ranks` fixture): the toy on ranks 0 and 1 alone (a 2-rank group),
# the toy on all 3, then the tiny Qwen2.5-VL on all 3. The tests read its results.
# -------------------------------------------------------------------------------------
QWEN_STEPS = 2
# The vision attention's key bias has a zero gradient in exact arithmetic (softmax ignores
# a constant per query), so Adafactor's normalised update moves it by ~lr in a direction
# set by rounding noise, which differs between one process and 3 ranks: keep lr small
# enough for that noise to stay far below the 1e-5 tolerance (it is ~6e-6 at lr 1e-2).
QWEN_LR = 1e-3


def _wrap(model, group, mixed_precision=None):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import CustomPolicy

    return FSDP(model, process_group=group, auto_wrap_policy=CustomPolicy(lambda m: isinstance(m, Block)),
                device_id=CPU, use_orig_params=False, mixed_precision=mixed_precision)


def _full_weights(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):  # FSDP2
        return {_clean(n): p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    with FSDP.summon_full_params(model):
        return {_clean(n): p.detach().clone() for n, p in model.named_parameters()}


def _wrap2(model, group):
    """FSDP2 on the toy: each block a unit, the root (embedding tied to the head) last."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, "cpu") if group is not None else init_device_mesh("cpu", (3,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _toy_fsdp2_phase(group):
    """ft's Adafactor on FSDP2's DTensor shards (dim-0 chunks, uneven: 13 rows on 2 or 3
    ranks): the single-process HF run, state as planned by `ft.fsdp2.planned_slices`."""
    from ft.shards import local

    model = _wrap2(_toy(), group)
    opt = _ft(model)
    losses, weights = _run(model, opt, STEPS)
    return {"losses": losses, "weights": weights, "state_bytes": state_bytes(opt),
            "rows": {_clean(n): local(p).shape[0] for n, p in model.named_parameters() if p.dim()}}


def _run(model, opt, steps):
    return [_train_step(model, opt) for _ in range(steps)], _full_weights(model)


def _ft(model):
    return Adafactor(model.parameters(), model, lr=LR, weight_decay=WD)


def _toy_phase(group, world, out_dir):
    out = {}
    snapshot_file = os.path.join(out_dir, "snapshot-2-ranks.pt")

    # ft's Adafactor for STEPS steps, keeping the state at RESUME_AT for the resume checks.
    model = _wrap(_toy(), group)
    opt = _ft(model)
    flats = [p for g in opt.param_groups for p in g["params"]]
    out["shards"] = [(list(f._shapes), list(f._shard_param_infos)) for f in flats]
    out["state_bytes"] = state_bytes(opt)
    out["losses"], snap = _run(model, opt, RESUME_AT)
    snap_opt = opt.fqn_state_dict()
    out["sd_keys"] = sorted(snap_opt)
    assert all(t.device == CPU for t in snap_opt.values())
    more, out["weights"] = _run(model, opt, STEPS - RESUME_AT)
    out["losses"] += more

    if world == 2:
        if dist.get_rank() == 0:
            torch.save({"weights": snap, "opt": snap_opt}, snapshot_file)
        # Resume: fresh model and optimizer from the step-RESUME_AT weights and state.
        fresh = _wrap(_toy(snap), group)
        fresh_opt = _ft(fresh)
        fresh_opt.load_fqn_state_dict(snap_opt)
        out["resumed"] = _run(fresh, fresh_opt, STEPS - RESUME_AT)
        # HF's Adafactor under the same FSDP sees flat shards: not the single-process run.
        hf = _wrap(_toy(), group)
        out["hf"] = _run(hf, _hf_adafactor(hf.parameters()), HF_STEPS)
    else:
        # Resume at another world size, from the state the 2 ranks saved.
        saved = torch.load(snapshot_file)
        other = _wrap(_toy(saved["weights"]), group)
        other_opt = _ft(other)
        other_opt.load_fqn_state_dict(saved["opt"])
        out["resumed_from_2"] = _run(other, other_opt, STEPS - RESUME_AT)

    # bf16 mixed precision: the optimizer gets fp32 master shards and fp32 gradients.
    from torch.distributed.fsdp import MixedPrecision

    mp_model = _wrap(_toy(), group, MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                   buffer_dtype=torch.bfloat16))
    mp_opt = _ft(mp_model)
    out["bf16"] = _run(mp_model, mp_opt, 2)
    assert all(t.dtype == torch.float32 for st in mp_opt.state.values() for s in st.values()
               for t in s.values() if torch.is_tensor(t))
    return out


def _qwen_step(model, opt, batch, norms=None):
    from ft.model import loss_sum
    from ft.optim import clip_grad_norm

    s, n = loss_sum(model, batch)
    (s / n).backward()
    if norms is not None:
        norms.append(clip_grad_norm(model, 0.0))  # the global norm, nothing clipped
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (s / n).item()


def _qwen_phase(rank, model_dir, out_dir, backend="fsdp1", optim="adafactor"):
    """ft's own wrapping (units, checkpoint wrappers, tied embeddings in the root, the 5-D
    Conv3d patch embedding) and optimizer construction, as the loop does it."""
    from ft.config import FSDPConfig, TrainConfig
    from ft.dist import DistInfo
    from ft.fsdp_wrap import plan_units, wrap_model
    from ft.model import load_model
    from ft.optim import build_optimizer

    info = DistInfo(rank=rank, world_size=3, local_rank=rank, device=CPU)
    model = load_model(model_dir, info)
    units = plan_units(model)
    planned = adafactor_state_bytes(units, 3, rank, backend)  # before wrapping frees the originals
    wrapped = wrap_model(model, units, FSDPConfig(backend=backend), "fp32", info)
    cfg = TrainConfig(optim=optim, learning_rate=QWEN_LR, weight_decay=WD)
    opt = build_optimizer(wrapped.parameters(), cfg, model=wrapped)
    batch = torch.load(os.path.join(out_dir, "batch.pt"))
    norms = []
    losses = [_qwen_step(wrapped, opt, batch, norms) for _ in range(QWEN_STEPS)]
    out = {"losses": losses, "norms": norms, "weights": _full_weights(wrapped), "state_bytes": state_bytes(opt),
           "planned": planned}
    if optim == "adafactor":
        out["keys"] = sorted(opt.fqn_state_dict())
    return out


def _worker(rank, port, model_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # 3 ranks on few cores: more intra-op threads only make OpenMP spin against each other.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=3)
    pair = dist.new_group([0, 1])  # every rank must take part in creating it
    out = {}
    if rank < 2:
        out[2] = _toy_phase(pair, 2, out_dir)
        out["fsdp2", 2] = _toy_fsdp2_phase(pair)
    dist.barrier()  # the 2-rank snapshot is on disk
    out[3] = _toy_phase(None, 3, out_dir)
    out["fsdp2", 3] = _toy_fsdp2_phase(None)
    out["qwen"] = _qwen_phase(rank, model_dir, out_dir)
    out["qwen", "fsdp2"] = _qwen_phase(rank, model_dir, out_dir, "fsdp2")
    out["qwen", "fsdp2", "adamw"] = _qwen_phase(rank, model_dir, out_dir, "fsdp2", "adamw")
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _qwen_batch(model_dir):
    from ft.collate import Collator
    from ft.dataset import ConversationDataset
    from ft.rows import load_rows
    from ft.processor import load_processor

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Small images (8 x 8 patches each): the vision tower's cost is in its patch count.
    processor = load_processor(model_dir, min_pixels=112 * 112, max_pixels=112 * 112)
    ds = ConversationDataset(load_rows(os.path.join(repo, "data/demo/train.jsonl")), processor, 1024)
    batch = Collator(processor)([ds[0], ds[1]]).inputs
    return batch


@pytest.fixture(scope="module")
def ranks(tiny_model_dir, tmp_path_factory):
    """Each rank's results of the one 3-process run."""
    from conftest import free_port

    out_dir = tmp_path_factory.mktemp("adafactor")
    batch = _qwen_batch(tiny_model_dir)
    torch.save(batch, out_dir / "batch.pt")
    mp.spawn(_worker, args=(free_port(), tiny_model_dir, str(out_dir)), nprocs=3, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(3)], batch


def _toy_plan():
    """The toy's FSDP units as `adafactor_state_bytes` reads them (ft.fsdp_wrap.plan_units
    is Qwen-specific): each unit's own parameters in flat order, the root's last."""
    model = _toy()
    blocks = [SimpleNamespace(params=dict(b.named_parameters())) for b in model.blocks]
    in_blocks = {id(p) for b in model.blocks for p in b.parameters()}
    root = {n: p for n, p in model.named_parameters() if id(p) not in in_blocks}
    return blocks + [SimpleNamespace(params=root)]


def _expected_bytes(shards):
    """Per-rank state from FSDP's shard infos: full row + column factors of each matrix
    the rank holds any element of, its own elements of the others' second moments."""
    total = 0
    for shapes, infos in shards:
        for shape, info in zip(shapes, infos):
            if not info.in_shard or not info.numel_in_shard:
                continue
            if len(shape) >= 2:
                total += 4 * (shape[:-1].numel() + (shape[:-2] + shape[-1:]).numel())
            else:
                total += 4 * info.numel_in_shard
    return total


def _cuts_mid_row(shards):
    return any(info.in_shard and len(shape) >= 2
               and (info.intra_param_start_idx % shape[-1] or (info.intra_param_end_idx + 1) % shape[-1])
               for shapes, infos in shards for shape, info in zip(shapes, infos))


# slow: the `ranks` fixture's one 3-process spawn (gloo ranks are processes of their own)
@pytest.mark.slow
def test_shard_invariant_on_2_and_3_ranks(ranks):
    ranks, _ = ranks
    ref_losses, ref_weights, _, _ = _reference()
    units = _toy_plan()

    for world in (2, 3):
        results = [r[world] for r in ranks[:world]]
        r0 = results[0]
        # The flat shards do cut matrices mid-row at this world size.
        assert any(_cuts_mid_row(r["shards"]) for r in results), world

        # Same losses and weights as single-process HF Adafactor.
        assert r0["losses"] == pytest.approx(ref_losses, abs=1e-5)
        assert _max_diff(r0["weights"], ref_weights) < 1e-5
        assert r0["losses"][-1] < r0["losses"][0] - 0.1  # and it did train

        # Memory: exactly the factored state, as FSDP's shard infos and as the plan predict.
        for rank, r in enumerate(results):
            assert r["state_bytes"] == _expected_bytes(r["shards"])
            assert r["state_bytes"] == adafactor_state_bytes(units, world, rank)

        # The state dict's keys: HF's parameter names, the same on every rank and world size.
        assert all(r["sd_keys"] == ranks[0][2]["sd_keys"] for r in results)
        assert {k.rsplit(".", 1)[0] for k in r0["sd_keys"]} == set(ref_weights)

    # HF's Adafactor under the same 2-rank FSDP is not the single-process run.
    two, three = ranks[0][2], ranks[0][3]
    hf_losses, hf_weights = two["hf"]
    assert max(abs(a - b) for a, b in zip(hf_losses, ref_losses)) > 1e-4
    _, ref_hf_steps, _, _ = _reference(HF_STEPS)
    assert _max_diff(hf_weights, ref_hf_steps) > 1e-4

    # bf16 mixed precision trains, and does not depend on the world size either.
    assert two["bf16"][0][-1] < two["bf16"][0][0]
    assert two["bf16"][0] == pytest.approx(three["bf16"][0], abs=1e-4)
    assert _max_diff(two["bf16"][1], three["bf16"][1]) < 1e-4


# slow: reads the `ranks` fixture's 3-process run
@pytest.mark.slow
def test_resume_from_fqn_state_dict(ranks):
    ranks, _ = ranks
    two, three = ranks[0][2], ranks[0][3]
    # Fresh model + optimizer on the same 2 ranks: bit-identical to the uninterrupted run.
    losses, weights = two["resumed"]
    assert losses == two["losses"][RESUME_AT:]
    assert _max_diff(weights, two["weights"]) == 0.0
    # Saved on 2 ranks, resumed on 3: the single-process run's end point.
    ref_losses, ref_weights, _, _ = _reference()
    losses, weights = three["resumed_from_2"]
    assert losses == pytest.approx(ref_losses[RESUME_AT:], abs=1e-5)
    assert _max_diff(weights, ref_weights) < 1e-5


def _qwen_reference(model_dir, batch, optim):
    """One process, the unwrapped model: HF's Adafactor, or torch's AdamW as ft builds it."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ft.config import TrainConfig
    from ft.optim import build_optimizer

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = (_hf_adafactor(model.parameters(), QWEN_LR) if optim == "adafactor" else
           build_optimizer(model.parameters(), TrainConfig(optim=optim, learning_rate=QWEN_LR, weight_decay=WD)))
    norms = []
    losses = [_qwen_step(model, opt, batch, norms) for _ in range(QWEN_STEPS)]
    return losses, norms, {n: p.detach() for n, p in model.named_parameters()}


# slow: reads the `ranks` fixture's 3-process run
@pytest.mark.slow
@pytest.mark.parametrize("backend,optim", [("fsdp1", "adafactor"), ("fsdp2", "adafactor"), ("fsdp2", "adamw")])
def test_tiny_qwen_on_3_ranks_matches_single_process_hf(ranks, tiny_model_dir, backend, optim):
    ranks, batch = ranks
    ref_losses, ref_norms, ref_weights = _qwen_reference(tiny_model_dir, batch, optim)

    key = "qwen" if backend == "fsdp1" else ("qwen", backend) if optim == "adafactor" else ("qwen", backend, optim)
    results = [r[key] for r in ranks]
    assert results[0]["losses"] == pytest.approx(ref_losses, abs=1e-5)
    assert all(r["norms"] == results[0]["norms"] for r in results)  # a float, the same on every rank
    assert results[0]["norms"] == pytest.approx(ref_norms, rel=1e-4)
    assert _max_diff(results[0]["weights"], ref_weights) < 1e-5
    for r in results:
        assert r["state_bytes"] == r["planned"] if optim == "adafactor" else r["state_bytes"] > 0
    if optim == "adafactor":
        # State keys are the HF parameter names (tied lm_head under embed_tokens' name).
        assert all(r["keys"] == results[0]["keys"] for r in results)
        assert {k.rsplit(".", 1)[0] for k in results[0]["keys"]} == set(ref_weights)
        assert "model.language_model.embed_tokens.weight.exp_avg_sq_row" in results[0]["keys"]


# slow: reads the `ranks` fixture's 3-process run
@pytest.mark.slow
def test_fsdp2_dim0_shards_match_single_process_hf(ranks):
    """FSDP2 gives each rank whole rows (Shard(0)), unevenly when the rows do not divide:
    ft's Adafactor is still the single-process HF run, with the factored state."""
    ranks, _ = ranks
    ref_losses, ref_weights, _, _ = _reference()
    units = _toy_plan()
    for world in (2, 3):
        results = [r["fsdp2", world] for r in ranks[:world]]
        rows = [r["rows"]["blocks.0.up.weight"] for r in results]  # 23 rows
        assert rows == ([12, 11] if world == 2 else [8, 8, 7])
        assert results[0]["losses"] == pytest.approx(ref_losses, abs=1e-5)
        assert _max_diff(results[0]["weights"], ref_weights) < 1e-5
        for rank, r in enumerate(results):
            assert r["state_bytes"] == adafactor_state_bytes(units, world, rank, "fsdp2")
