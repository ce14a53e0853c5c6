"""A/B of the dropout-mask generator in one process: the `cpu` benchmark preset's model with LoRA-FA at dropout 0.05,
forward+backward timed with torch's seeded `bernoulli_` (the previous generator) and with
`hf_lorafa.layers.dropout_mask` (numpy SFC64 on CPU), interleaved step by step.

    python scripts/dropout_mask_ab.py
"""

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_lorafa.layers as layers
from hf_lorafa import LoRAFAConfig, inject_adapters
from hf_lorafa.bench import PRESETS


def bernoulli_mask(shape, p, seed, device, dtype):
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    preset = PRESETS["cpu"]
    base = LlamaForCausalLM(LlamaConfig(**preset["model"])).to(torch.bfloat16)
    model = inject_adapters(base, LoRAFAConfig(method="lorafa", r=16, alpha=32, dropout=0.05)).train()
    ids = torch.randint(0, preset["model"]["vocab_size"], (preset["batch"], preset["seq"]))
    generators = {"bernoulli_": bernoulli_mask, "sfc64": layers.dropout_mask}
    times = {name: [] for name in generators}
    for i in range(12):
        for name, generator in generators.items():
            layers.dropout_mask = generator
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad()
            if i >= 2:  # two warm rounds
                times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name}: median forward+backward {statistics.median(values):.3f} s")
    print(f"bernoulli_ / sfc64: {statistics.median(times['bernoulli_']) / statistics.median(times['sfc64']):.3f}")


if __name__ == "__main__":
    main()
