"""One benchmark configuration, measured in the process that runs this module (`hf-lorafa bench` starts one per
configuration, so memory figures never mix): build the model with the configuration's adapters, take a warm step,
then measure saved-for-backward bytes, retained and peak memory, and the median step time (see `bench`).

    python -m hf_lorafa.cli.bench_worker '{"method": "lorafa", ...}'     # prints the result as one JSON line
"""

from __future__ import annotations

import json
import os
import sys
import time


def _build(spec: dict):
    """The model with the configuration's adapters, and its optimizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..tuners.config import LoRAFAConfig
    from ..tuners.injection import inject_adapters

    dtype, device = getattr(torch, spec["dtype"]), spec["device"]
    torch.manual_seed(0)
    config = LlamaConfig(**spec["model"], max_position_embeddings=8192, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if spec["load_in_4bit"]:
        from ..data.base_model import quantize_model

        model = quantize_model(model, load_in_4bit=True, bnb_4bit_compute_dtype=dtype).to(device)
    method, r = spec["method"], spec["r"]
    if method == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "floor":
        model.enable_input_require_grads()
        return model, None
    if method.startswith("peft-"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=spec["dropout"], target_modules="all-linear")
        )
        if method == "peft-lorafa":
            from peft.optimizers import create_lorafa_optimizer

            return model, create_lorafa_optimizer(model, r=r, lora_alpha=2 * r, lr=1e-4)
    else:
        inject_adapters(model, LoRAFAConfig(method=method.split("+")[0], r=r, alpha=2 * r, dropout=spec["dropout"]))
        if method.endswith("+savers"):
            from ..training.activation_savers import apply_activation_savers

            apply_activation_savers(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def _prepare(spec: dict):
    """The configuration's model in train mode, its optimizer, and the fixed batch of token ids."""
    import torch

    model, optimizer = _build(spec)
    model.train()
    ids = torch.randint(
        0, spec["model"]["vocab_size"], (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(1)
    ).to(spec["device"])
    return model, optimizer, ids


def _train_step(model, optimizer, ids, forward_out=None) -> None:
    """One training step (the forward's output may be given when it was already run, e.g. to count its bytes)."""
    out = forward_out if forward_out is not None else model(input_ids=ids, labels=ids)
    out.loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)


def measure(spec: dict) -> dict:
    """One configuration, in this (fresh) process: the measurements the module docstring describes."""
    import gc
    import statistics

    import torch

    from ..memory.estimate import process_overhead
    from ..memory.measure import (
        current_rss_bytes,
        proc_status_bytes,
        process_peak_bytes,
        reset_process_peak,
        saved_tensor_bytes,
    )
    from ..tuners.injection import count_parameters

    torch.set_num_threads(min(2, os.cpu_count() or 1)) if spec["device"] == "cpu" else None
    cuda = spec["device"] == "cuda"
    if spec["load_in_4bit"]:
        from ..tuners.quantization import require_bitsandbytes

        require_bitsandbytes()
    # Measured here, before the model exists, after a step of a throwaway copy of the configuration: the libraries it
    # imports, the kernels its shapes need and the code its adapters run are the process's, not the model's.
    overhead = process_overhead(lambda: _train_step(*_prepare(spec))) if not cuda else 0
    model, optimizer, ids = _prepare(spec)

    def step(forward_out=None):
        _train_step(model, optimizer, ids, forward_out)
        if cuda:
            torch.cuda.synchronize()

    step()  # warm: optimizer states exist from here on, as in any step after the first
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = reset_process_peak()
    before = current_rss_bytes()
    saved, out = saved_tensor_bytes(model, lambda: model(input_ids=ids, labels=ids))
    retained = current_rss_bytes() - before
    step(out)
    del out
    peak = proc_status_bytes("VmHWM") if reset else process_peak_bytes()
    result = {
        **spec,
        "saved_bytes": saved,
        "retained_rss_bytes": retained,
        "overhead_bytes": overhead,
        "peak_rss_bytes": peak,
        "peak_source": "VmHWM" if reset else "ru_maxrss",
    }
    if cuda:
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    if cuda:  # on CPU this process's allocator setting distorts timings: `time_steps` runs in another process
        times = []
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        result["step_seconds"] = statistics.median(times)
        result["tokens_per_second"] = spec["batch"] * spec["seq"] / result["step_seconds"]
    result["trainable_parameters"], result["total_parameters"] = count_parameters(model)
    sweep = {}
    for seq in spec["seq_sweep"]:
        longer = torch.randint(0, spec["model"]["vocab_size"], (spec["batch"], seq)).to(spec["device"])
        sweep[str(seq)], _ = saved_tensor_bytes(model, lambda x=longer: model(input_ids=x, labels=x).loss)
    result["saved_bytes_by_seq"] = sweep
    if spec["method"].startswith("lamda"):
        from ..tuners.lamda import lamda_schedule_step

        result["trainable_parameters_after_freeze"] = lamda_schedule_step(model, 1.0)
    estimate = estimate_for(spec, 0 if cuda else overhead)
    if estimate is not None:
        result["estimate"] = estimate
    return result


def estimate_for(spec: dict, overhead: int) -> dict | None:
    """`estimate_memory` for a configuration (`+savers`: with the activation savers' defaults)."""
    import torch
    from transformers import LlamaConfig

    from ..memory.estimate import estimate_memory

    name = {"floor": "none", "peft-lora": "lora", "peft-lorafa": "lora"}.get(spec["method"], spec["method"])
    savers = name.endswith("+savers")
    est = estimate_memory(
        LlamaConfig(**spec["model"]),
        name.removesuffix("+savers"),
        spec["batch"],
        spec["seq"],
        r=spec["r"],
        dtype=getattr(torch, spec["dtype"]),
        load_in_4bit=spec["load_in_4bit"],
        dropout=spec["dropout"],
        device=spec["device"],
        overhead=overhead,
        activation_savers=savers,
        block_recompute=savers,  # the worker applies the savers at their function's defaults: all of them
    )
    return est.to_dict()


def time_steps(spec: dict) -> dict:
    """The median step time of the configuration, in a process with the default allocator (see `bench`)."""
    import statistics

    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1)) if spec["device"] == "cpu" else None
    model, optimizer, ids = _prepare(spec)
    times = []
    for _ in range(spec["steps"] + 1):  # the first step is the warm one (optimizer states, allocator)
        start = time.perf_counter()
        _train_step(model, optimizer, ids)
        times.append(time.perf_counter() - start)
    return {"step_seconds": statistics.median(times[1:])}


if __name__ == "__main__":
    job = time_steps if sys.argv[2:] == ["--timing"] else measure
    print(json.dumps(job(json.loads(sys.argv[1]))))
