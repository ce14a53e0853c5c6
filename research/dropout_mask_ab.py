"""A/B of the dropout-mask generator behind LoRA-FA's CPU default: torch's seeded `bernoulli_` (MT19937, the previous
generator) against numpy's SFC64 (raw 32-bit words against `p · 2³²`; layers now draw a byte first: `keep_mask`).

A frozen-A layer keeps no mask for backward: it draws it from a saved seed in forward and again in backward, so a step
draws every adapted layer's `(batch, seq, d_in)` mask twice. On the `cpu` bench preset's model with LoRA-FA at dropout
0.05, this times one step's draws with each generator, interleaved round by round, beside the shipped layers' whole
forward+backward step for scale.

    python -m research.dropout_mask_ab
"""

import statistics
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_lorafa import LoRAFAConfig, adapter_layers, inject_adapters

# `hf-lorafa bench --preset cpu`'s model and batch (BENCHMARKS.md), pinned: the A/B was run on these.
MODEL = dict(
    vocab_size=32000,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=2,
)
BATCH, SEQ, P = 4, 256, 0.05


def torch_mask(shape: tuple, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.bfloat16).bernoulli_(1.0 - P, generator=generator).div_(1.0 - P)


def sfc64_mask(shape: tuple, seed: int) -> torch.Tensor:
    n = int(np.prod(shape))
    words = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    keep = torch.from_numpy(words >= np.uint32(round(P * 2**32))).view(shape)
    return keep.to(torch.bfloat16).mul_(1.0 / (1.0 - P))


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**MODEL)).to(torch.bfloat16)
    model = inject_adapters(base, LoRAFAConfig(method="lorafa", r=16, alpha=32, dropout=P)).train()
    shapes = [(BATCH, SEQ, layer.in_features) for layer in adapter_layers(model).values()]
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ))
    times: dict[str, list[float]] = {"bernoulli_": [], "sfc64": [], "step (shipped layers)": []}
    for i in range(12):
        for name, draw in (("bernoulli_", torch_mask), ("sfc64", sfc64_mask)):
            start = time.perf_counter()
            for seed, shape in enumerate(shapes * 2):  # forward and backward each draw every layer's mask
                draw(shape, seed)
            if i >= 2:  # two warm rounds
                times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad()
        if i >= 2:
            times["step (shipped layers)"].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.3f} s a step")
    print(f"bernoulli_ / sfc64: {statistics.median(times['bernoulli_']) / statistics.median(times['sfc64']):.3f}")


if __name__ == "__main__":
    main()
