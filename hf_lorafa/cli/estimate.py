"""`hf-lorafa estimate`: the memory estimator (`hf_lorafa.memory.estimate`) on the command line."""

from __future__ import annotations

import argparse

import torch

from ..memory.estimate import METHODS, OPTIMIZER_STATES, estimate_memory, model_config, process_overhead
from ..training.block_recompute import BLOCK_CHOICES


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a batch, a length, a rank of 0 or -5 means nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """`hf-lorafa estimate --model CONFIG_OR_ID --method … --batch … --seq … [--load-in-4bit]`."""
    parser = argparse.ArgumentParser(prog="hf-lorafa estimate", description="Predict training memory per method.")
    parser.add_argument("--model", required=True, help="Hub id, local folder, config.json folder or smollm2.")
    parser.add_argument("--method", default="lorafa", help=f"One of {', '.join(METHODS)}, or 'all'.")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq", type=positive_int, default=512)
    parser.add_argument("--r", type=positive_int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZER_STATES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    savers = parser.add_argument_group("activation savers (the trainer's defaults: savers on, every block replayed)")
    savers.add_argument("--activation-savers", action="store_true", help="Count what the savers keep.")
    savers.add_argument(
        "--block-recompute",
        choices=["none", *BLOCK_CHOICES],
        default="all",
        help="With --activation-savers: which blocks backward replays, as the trainer's block_recompute "
        "(default: all, the trainer's default).",
    )
    args = parser.parse_args(argv)
    # On CPU the peak is resident memory, which includes this interpreter with torch loaded: measured, not guessed.
    overhead = process_overhead() if args.device == "cpu" else 0
    methods = [m for m in METHODS if not (m == "full" and args.load_in_4bit)] if args.method == "all" else None
    methods = methods or [args.method]
    config = model_config(args.model)
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and args.seq > context:
        parser.error(f"argument --seq: {args.seq} is beyond {args.model}'s context of {context} tokens")
    for method in methods:
        est = estimate_memory(
            config,
            method,
            args.batch,
            args.seq,
            r=args.r,
            dtype=getattr(torch, args.dtype),
            load_in_4bit=args.load_in_4bit,
            optimizer=args.optimizer,
            dropout=args.dropout,
            device=args.device,
            overhead=overhead,
            activation_savers=args.activation_savers,
            block_recompute=args.block_recompute,
        )
        print(
            f"\n{args.model}: {method}, batch {args.batch} × seq {args.seq}, r={args.r}, {args.dtype}"
            f"{', 4-bit' if args.load_in_4bit else ''}, {args.optimizer}"
            f"{', activation savers' if args.activation_savers else ''}"
            f"{f', block recompute: {args.block_recompute}' if args.activation_savers else ''}"
        )
        print(est.table())
    return 0
