"""A/B of the dropout-mask generator in one process: the `cpu` benchmark preset's model with LoRA-FA at dropout 0.05,
forward+backward timed with torch's seeded `bernoulli_` (the previous generator) and with numpy's SFC64 (the CPU
default of `hf_lorafa.layers.dropout_mask`), interleaved step by step; the layers' `mask_generator` selects one.

    python scripts/dropout_mask_ab.py
"""

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_lorafa import LoRAFAConfig, inject_adapters
from hf_lorafa.bench import PRESETS
from hf_lorafa.injection import adapter_layers


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    preset = PRESETS["cpu"]
    base = LlamaForCausalLM(LlamaConfig(**preset["model"])).to(torch.bfloat16)
    model = inject_adapters(base, LoRAFAConfig(method="lorafa", r=16, alpha=32, dropout=0.05)).train()
    ids = torch.randint(0, preset["model"]["vocab_size"], (preset["batch"], preset["seq"]))
    generators = {"bernoulli_": "torch", "sfc64": "sfc64"}
    times = {name: [] for name in generators}
    for i in range(12):
        for name, generator in generators.items():
            for layer in adapter_layers(model).values():
                layer.mask_generator = generator
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
