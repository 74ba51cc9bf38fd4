"""Qwen3-VL-MoE end to end through ./launch.sh, on the rows of tests/test_train_e2e.py
(images, videos, text-only; the collator's dummy images and videos on ranks that lack
one), against a hand-written single-process reference that adds transformers' own
load-balancing loss of each step's whole batch (its sample tokens) to the
language-model loss:

- 2 ranks on fsdp1 and on fsdp2, and 1 rank accumulating 2 micro-batches (the counting
  pass), with AdamW, and ft's Adafactor on 2 ranks against HF's, reproduce the reference's language-model losses, load-balancing losses,
  gradient norms, eval loss and final weights: the loss is over the global batch,
  whatever the split;
- bf16 master weights train to the fp32 losses up to their rounding;
- a checkpoint of the 2-rank run resumes on 1 rank and ends at the same weights;
- a frozen router stays bit-identical while the experts train;
- the export loads with from_pretrained and AutoProcessor and generates from an image
  and from a video, and its processor prepares the rows as training did.

The weight of the loss is 0.5 here, not the checkpoint's 0.001, so that a wrong
gradient of it would move the weights by more than the tolerance.
"""

import pytest
import torch

from test_families_e2e import ONE_STEP_BATCH, _check_against, _export_generates, _export_prepares_inputs_as_training_did, _max_diff, _weights
from test_train_e2e import STEPS, dataset, launch, read_metrics, reference  # noqa: F401 (dataset: a fixture)

pytestmark = pytest.mark.slow

FAMILY, COEF = "qwen3_vl_moe", 0.5
BALANCE = (f"train.router_aux_loss_coef={COEF}",)


def _check_aux(out, want: list, name: str) -> None:
    train, _ = read_metrics(out)
    got = [r["aux_loss"] for r in train]
    assert got == pytest.approx(want, rel=1e-6), name
    assert all("expert_load_max_over_mean" in r and "expert_share/0" in r for r in train), name
    print(f"{name}: aux_loss {', '.join(f'{a:.6f}' for a in got)} (reference {', '.join(f'{a:.6f}' for a in want)})")


def test_moe_trains_sharded_as_one_process(tiny_family_dir, dataset, tmp_path):  # noqa: F811
    model_dir = tiny_family_dir(FAMILY)
    auxes: list = []
    ref = reference(model_dir, dataset, aux_coef=COEF, auxes=auxes)
    initial = _weights(model_dir)
    assert _max_diff(initial, ref[3]) > 1e-3
    # The balance term matters at this weight: without it the weights end elsewhere.
    assert _max_diff(reference(model_dir, dataset)[3], ref[3]) > 1e-4

    fsdp1 = launch(tmp_path, model_dir, dataset, 2, *ONE_STEP_BATCH, *BALANCE, "train.save_steps=2")
    _check_against(fsdp1, ref, "moe fsdp1")
    _check_aux(fsdp1, auxes, "moe fsdp1")
    fsdp2 = launch(tmp_path, model_dir, dataset, 2, *ONE_STEP_BATCH, *BALANCE, "fsdp.backend=fsdp2")
    _check_against(fsdp2, ref, "moe fsdp2")
    _check_aux(fsdp2, auxes, "moe fsdp2")
    # 1 rank, 2 micro-batches a step: the counting pass gives the step's counts first.
    accumulated = launch(tmp_path, model_dir, dataset, 1, *ONE_STEP_BATCH, *BALANCE,
                         "train.gradient_accumulation_steps=2")
    _check_against(accumulated, ref, "moe 1 rank x 2 micro-batches")
    _check_aux(accumulated, auxes, "moe 1 rank x 2 micro-batches")

    # ft's Adafactor (the recipe's optimizer) on the fused 3-D expert weights: HF's in one
    # process, which factors each expert's matrix over its last two dimensions.
    hf_auxes: list = []
    hf = reference(model_dir, dataset, optim="adafactor", aux_coef=COEF, auxes=hf_auxes)
    adafactor = launch(tmp_path, model_dir, dataset, 2, *ONE_STEP_BATCH, *BALANCE, "train.optim=adafactor")
    _check_against(adafactor, hf, "moe adafactor")
    _check_aux(adafactor, hf_auxes, "moe adafactor")
    # bf16 master weights train too: the losses of fp32 weights up to the rounding.
    bf16 = launch(tmp_path, model_dir, dataset, 2, *ONE_STEP_BATCH, *BALANCE, "train.optim=adafactor",
                  "train.master_weights=bf16", "fsdp.backend=fsdp2")
    assert [r["loss"] for r in read_metrics(bf16)[0]] == pytest.approx(hf[0], abs=2e-2)
    assert _max_diff(_weights(bf16 / "best"), {k: v.bfloat16().float() for k, v in initial.items()}) > 1e-3

    # Step 2's checkpoint of the 2-rank run, resumed on 1 rank (global batch 2 either way).
    resumed = launch(tmp_path, model_dir, dataset, 1, "train.per_device_train_batch_size=2", *BALANCE,
                     f"train.resume={fsdp1 / 'checkpoints' / 'step-2'}")
    assert [r["step"] for r in read_metrics(resumed)[0]] == [STEPS]
    assert _max_diff(_weights(resumed / "best"), ref[3]) <= 1e-5

    # The routers frozen on their own: bit-identical, while the experts beside them train.
    frozen = launch(tmp_path, model_dir, dataset, 2, *ONE_STEP_BATCH, *BALANCE, "model.freeze_router=true")
    got = _weights(frozen / "best")
    routers = [k for k in got if k.endswith(".mlp.gate.weight")]
    experts = [k for k in got if ".mlp.experts." in k]
    assert routers and experts
    assert all(torch.equal(got[k], initial[k]) for k in routers)
    assert min((got[k] - initial[k]).abs().max().item() for k in experts) > 1e-4

    _export_prepares_inputs_as_training_did(model_dir, fsdp1 / "best", tmp_path)
    _export_generates(fsdp1 / "best", dataset)
