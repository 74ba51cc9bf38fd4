"""The chunked loss (ft.model.loss_sum with chunk_size > 0) against the plain path that
materialises every logit: same loss and gradients, bare and under FSDP1 on 2 gloo ranks
with activation checkpointing, fp32 and bf16 mixed precision."""

import inspect
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import Qwen2_5_VLForConditionalGeneration

from conftest import chat_row, free_port, write_jsonl, write_test_image
from ft.config import TrainConfig
from ft.collate import Collator
from ft.dataset import ConversationDataset
from ft.rows import load_rows
from ft.model import chunked_cross_entropy_sum, loss_sum
from ft.processor import load_processor

# Several chunks per batch (the batches below have ~20-40 label tokens each), and one
# that does not divide them, so the last chunk is a partial one.
CHUNK = 7


def _rows(data_dir):
    write_test_image(data_dir / "a.png", size=(84, 56), seed=1)
    rows = [
        chat_row([{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is it?"}],
            "A smooth gradient with fine noise over it, mostly green."),
        chat_row("Count to five.", "One, two, three, four, five."),
        chat_row("Say hi.", "Hi."),
        chat_row("Name three colours.", "Red, green and a deep, dark blue."),
    ]
    return write_jsonl(data_dir / "rows.jsonl", rows)


def _batches(model_dir, rows_file):
    """Batch 0: an image row and a text row (padded). Batch 1: text only, so the
    collator adds its dummy image."""
    processor = load_processor(model_dir)
    ds = ConversationDataset(load_rows(rows_file), processor, 512)
    collate = Collator(processor)
    return [collate([ds[0], ds[1]]).inputs, collate([ds[2], ds[3]]).inputs]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return _rows(tmp_path_factory.mktemp("loss-data"))


def _loss_and_grads(model, batch, chunk_size):
    model.zero_grad()
    s, n = loss_sum(model, batch, chunk_size)
    s.backward()
    return s.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}


def _assert_close(actual, expected, rtol, what, atol=1e-12):
    """|a - e| <= rtol * max|e| + atol: a tolerance relative to the tensor's scale,
    because elementwise relative errors of near-zero gradient entries mean nothing."""
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale + atol, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_model_dir_untied"])
def test_chunked_equals_plain_fp32(fixture, request, rows_file):
    model_dir = request.getfixturevalue(fixture)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    keys_before = list(model.state_dict())
    for batch in _batches(model_dir, rows_file):
        plain, n, plain_grads = _loss_and_grads(model, batch, 0)
        assert n > 2 * CHUNK
        chunked, n_chunked, chunked_grads = _loss_and_grads(model, batch, CHUNK)
        assert n_chunked == n
        _assert_close(chunked, plain, 1e-5, "loss")
        # The plain path is HF's own loss, as a sum.
        assert model(**batch).loss.item() * n == pytest.approx(plain.item(), rel=1e-5)
        for name, g in plain_grads.items():
            _assert_close(chunked_grads[name], g, 1e-5, name)
        assert model.lm_head.weight.grad.abs().max() > 0  # the chunked path's, kept
    # The hooks are gone and nothing was renamed or untied.
    assert list(model.state_dict()) == keys_before
    assert not model._forward_hooks and not model.model._forward_hooks
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tied


def test_chunked_cross_entropy_gradcheck():
    # float64, so gradcheck's finite differences are meaningful; 10 rows in chunks of 4.
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (10,), generator=g)
    torch.autograd.gradcheck(lambda h, w: chunked_cross_entropy_sum(h, w, targets, 4), (hidden, weight))
    expected = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
    assert chunked_cross_entropy_sum(hidden, weight, targets, 4).item() == pytest.approx(expected.item())


def test_chunked_cross_entropy_bf16_matches_plain_bf16():
    """bf16 weights (FSDP mixed precision): same logits rounding, gradients within bf16
    rounding of the plain path's (the weight gradient is summed over chunks in bf16)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 32, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(300, 32, generator=g) / 4).bfloat16().requires_grad_()
    targets = torch.randint(0, 300, (40,), generator=g)

    plain = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    plain.backward()
    plain_grads = hidden.grad.float(), weight.grad.float()
    hidden.grad = weight.grad = None
    chunked = chunked_cross_entropy_sum(hidden, weight, targets, 16)
    chunked.backward()
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    _assert_close(hidden.grad.float(), plain_grads[0], 1e-2, "hidden grad")
    _assert_close(weight.grad.float(), plain_grads[1], 1e-2, "weight grad")


def test_default_chunk_size_is_the_config_default():
    default = inspect.signature(loss_sum).parameters["chunk_size"].default
    assert default == TrainConfig().loss_chunk_size > 0


# -------------------------------------------------------------------------------------
# FSDP1, 2 gloo ranks
# -------------------------------------------------------------------------------------
STEPS = 2


def _worker(rank, world, port, model_dir, rows_file, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ft import dist
    from ft.config import FSDPConfig
    from ft.fsdp_wrap import plan_units, wrap_model
    from ft.model import load_model

    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    info = dist.init_distributed()
    # Rank 0 trains on the image batch, rank 1 on the text batch (with the dummy image).
    batch = _batches(model_dir, rows_file)[rank]
    full = StateDictOptions(full_state_dict=True)
    result = {}
    for precision in ("fp32", "bf16"):
        runs = {}
        for chunk_size in (0, CHUNK):
            model = load_model(model_dir, info)
            model = wrap_model(model, plan_units(model), FSDPConfig(), precision, info)
            # SGD: the update is linear in the gradient. AdamW's first steps are about
            # sign(grad), which turns float noise in near-zero gradient entries into
            # lr-sized weight differences and would make the comparison meaningless.
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            losses, shard_grads = [], []
            start = {k: v.clone() for k, v in get_model_state_dict(model, options=full).items()}
            for _ in range(STEPS):
                s, n = loss_sum(model, batch, chunk_size)
                # Each rank's own batch, with a global divisor as in the loop.
                total_n = torch.tensor(float(n))
                torch.distributed.all_reduce(total_n)
                (s / total_n).backward()
                losses.append(s.item())
                # Flat shards after the reduce-scatter: this rank's part of the gathered
                # gradient.
                shard_grads.append([p.grad.clone() for p in model.parameters()])
                opt.step()
                opt.zero_grad()
            model.eval()
            with torch.no_grad():
                eval_loss = loss_sum(model, batch, chunk_size)[0].item()
            weights = get_model_state_dict(model, options=full)
            runs[chunk_size] = {"losses": losses, "shard_grads": shard_grads, "eval": eval_loss,
                                "start": start, "updates": {k: v - start[k] for k, v in weights.items()}}
        result[precision] = runs
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.cleanup()


# slow: 2 gloo ranks are processes of their own (mp.spawn)
@pytest.mark.slow
def test_fsdp_two_ranks_chunked_equals_plain(tiny_model_dir, rows_file, tmp_path):
    mp.spawn(_worker, args=(2, free_port(), tiny_model_dir, rows_file, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        # fp32: as exact as the unwrapped comparison. bf16: both paths round the same
        # logits (losses within 5e-5 measured), but bf16 gradients differ by bf16
        # roundings (the chunked weight gradient is summed over chunks in bf16; 7e-3
        # of the largest entry measured).
        for precision, loss_rtol, rtol in (("fp32", 1e-5, 1e-5), ("bf16", 1e-3, 2e-2)):
            plain, chunked = result[precision][0], result[precision][CHUNK]
            for step in range(STEPS):
                assert chunked["losses"][step] == pytest.approx(plain["losses"][step], rel=loss_rtol)
                for a, e in zip(chunked["shard_grads"][step], plain["shard_grads"][step]):
                    _assert_close(a, e, rtol, f"{precision} step {step} rank {rank} grad shard")
            assert chunked["eval"] == pytest.approx(plain["eval"], rel=loss_rtol)
            # The full (gathered) weights moved by the same amounts: same keys, and the
            # same total update of every parameter, up to the fp32 rounding of the
            # weights the updates are differences of.
            assert chunked["updates"].keys() == plain["updates"].keys()
            for name, update in plain["updates"].items():
                ulp = 2 * torch.finfo(torch.float32).eps * plain["start"][name].abs().max().item()
                _assert_close(chunked["updates"][name], update, rtol, f"{precision} update of {name}", ulp)
        # The steps did train: the loss moved.
        assert abs(result["fp32"][0]["losses"][1] - result["fp32"][0]["losses"][0]) > 1e-3
