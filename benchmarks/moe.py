"""What a mixture of experts costs against its dense twin, per experts kernel: one
process, the language model's forward and backward on one row of text tokens.

    python benchmarks/moe.py [--hidden 256] [--layers 2] [--experts 32] [--top-k 4]
        [--tokens 2048] [--steps 5] [--kernels grouped_mm batched_mm eager]
        [--device cpu|cuda] [--dtype fp32|bf16]

The MoE model is the tiny Qwen3-VL-MoE config at the given sizes, each expert `hidden`
wide; its dense twin is the tiny Qwen3-VL with an MLP `top_k x hidden` wide: the same
active parameters per token, hence the same model FLOPs. For each of transformers'
experts kernels (`experts_implementation`: `grouped_mm` is one grouped matrix multiply
over all experts, `batched_mm` a batched one over each token's chosen experts' weights,
`eager` a Python loop over the experts that got tokens) it prints the median seconds per
forward+backward and the ratio to the dense twin. The training loop runs the kernel
transformers picks (`grouped_mm` where torch has it) and says so at start-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ft.families import family_named
from ft.tinymodel import build_tokenizer, special_token_ids, tiny_config


def _model(family: str, args, kernel: str | None):
    ids = special_token_ids(build_tokenizer("small"))
    config = tiny_config(vocab_size=1000, token_ids=ids, hidden=args.hidden, text_layers=args.layers,
                         family=family)
    text = config.text_config
    if family_named(family).is_moe:
        text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size = args.experts, args.top_k, args.hidden
    else:
        text.intermediate_size = args.top_k * args.hidden
    kwargs = {"experts_implementation": kernel} if kernel else {}
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = family_named(family).model_class()._from_config(config, dtype=dtype, **kwargs)
    return model.to(args.device).train()


def _seconds(model, args) -> float:
    ids = torch.randint(0, 1000, (1, args.tokens), device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = []
    for _ in range(args.steps + 1):  # the first one warms up
        sync()
        start = time.perf_counter()
        out = model.model.language_model(input_ids=ids, use_cache=False)
        out.last_hidden_state.float().square().mean().backward()
        sync()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--kernels", nargs="+", default=["grouped_mm", "batched_mm", "eager"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype}; hidden {args.hidden}, "
          f"{args.layers} layers, {args.experts} experts, top-{args.top_k}, {args.tokens} tokens")
    dense = _seconds(_model("qwen3_vl", args, None), args)
    print(f"{'dense twin (MLP ' + str(args.top_k * args.hidden) + ' wide)':<32} {dense:8.3f} s  1.00x")
    for kernel in args.kernels:
        try:
            moe = _seconds(_model("qwen3_vl_moe", args, kernel), args)
        except (ValueError, RuntimeError, ImportError, KeyError) as e:  # a kernel this torch lacks
            print(f"{'MoE, ' + kernel:<32} unavailable: {str(e).splitlines()[0]}")
            continue
        print(f"{'MoE, ' + kernel:<32} {moe:8.3f} s  {moe / dense:.2f}x")


if __name__ == "__main__":
    main()
