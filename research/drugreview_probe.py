"""Why drug-review runs could sit at the class prior: how much the frozen MiniLM's features say about the label.

For the [CLS] state, BERT's pooler output (what BertForSequenceClassification's head reads) and the mean-pooled
state (how all-MiniLM-L6-v2 was trained), it measures the spread of each feature across the training reviews and
the test accuracy / macro-F1 of a logistic-regression probe fitted on the frozen features (L-BFGS, standardised
features, three L2 strengths), and the top singular values of both accuracy models' weights.

It also measures what a frozen A passes to B in each adapted layer (`subspace`): for z = A x over the tokens of 32
training rows, the share of z's energy that varies from token to token (1 − ‖mean z‖² / mean ‖z‖²), with A = W's
top-r right singular vectors (LaMDA's `"residual"` init) and with a random orthonormal A (LoRA-FA's, LaMDA's
`"spectral"`). B's gradient is `g zᵀ`: the constant part of z can only shift every token the same way.
`frozen_a` measures, for `frozen_a_init` (hf_lorafa/calibration.py), how much larger z_i's mean square is along
the data's top directions than along a random one (`tr(M)/d_in`, M the inputs' second moment), before the rows are
scaled to a random row's: the median over the adapted layers, over 4 training batches at each task's batch size.
Writes research/results/drugreview-probe.json, which RESULTS.md quotes (`--only frozen_a` updates that entry alone).

    python -m research.drugreview_probe
    python -m research.drugreview_probe --only frozen_a
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_lorafa import classification_metrics, drugreview_split, resolve_model
from research.accuracy import RESULTS, TASKS


def features(model, tokenizer, rows: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    out = {"cls": [], "pooler": [], "mean": []}
    for i in range(0, len(rows), 32):
        batch = tokenizer(
            [r["text"] for r in rows[i : i + 32]],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            hidden = model.bert(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out["cls"].append(hidden[:, 0])
            out["pooler"].append(model.bert.pooler(hidden))
            out["mean"].append((hidden * mask).sum(1) / mask.sum(1))
    return {k: torch.cat(v) for k, v in out.items()}


def probe(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, l2: float) -> torch.Tensor:
    mean, std = train.mean(0), train.std(0) + 1e-6
    x = (train - mean) / std
    linear = torch.nn.Linear(x.shape[1], 3)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), labels) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return linear((test - mean) / std)


def top_singular_values(model_name: str) -> dict[str, float]:
    """Median over the adapted (linear, non-embedding) weights of σ_1 and σ_8: the size of LaMDA's residual-init step.

    An optimizer step on B's column i moves W by σ_i times what the same step on LoRA-FA's B does (lamda.py).
    """
    path = Path(resolve_model(model_name))
    firsts, eighths = [], []
    for file in sorted(path.glob("*.safetensors")):
        for key, weight in load_file(file).items():
            if weight.ndim == 2 and "embed" not in key and min(weight.shape) > 16:
                sigma = torch.linalg.svdvals(weight.float())
                firsts.append(float(sigma[0]))
                eighths.append(float(sigma[7]))
    return {"sigma_1": statistics.median(firsts), "sigma_8": statistics.median(eighths), "weights": len(firsts)}


def subspace_variation(model: torch.nn.Module, batch: dict, r: int) -> dict[str, float]:
    """Median over the adapted layers of the token-varying share of z = A x, for A top-r singular and random."""
    from hf_lorafa import LoRAFAConfig, adapter_layers, inject_adapters

    # The layers LoRA-FA adapts (B = 0: the model's outputs, and so every layer's inputs, stay the base model's).
    inject_adapters(model, LoRAFAConfig(method="lorafa", r=r, modules_to_save=["classifier", "pooler"]))
    layers = adapter_layers(model)
    inputs, hooks = {}, []
    for name, layer in layers.items():
        hooks.append(layer.register_forward_hook(lambda m, i, o, n=name: inputs.__setitem__(n, i[0].detach())))
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    mask = batch["attention_mask"].bool()
    generator = torch.Generator().manual_seed(0)
    shares = {"top": [], "random": []}
    for name, layer in layers.items():
        x = inputs[name][mask].double()
        vh = torch.linalg.svd(layer.base_layer.weight.detach().double(), full_matrices=False)[2]
        random, _ = torch.linalg.qr(torch.randn(x.shape[1], r, generator=generator, dtype=torch.float64))
        for kind, a in (("top", vh[:r].t()), ("random", random)):
            z = x @ a
            shares[kind].append(1 - float(z.mean(0).square().sum() / z.square().sum(1).mean()))
    return {kind: statistics.median(v) for kind, v in shares.items()} | {"layers": len(layers)}


def subspaces() -> dict[str, dict[str, float]]:
    """`subspace_variation` for both accuracy models on 32 rows of their own task, at their protocol's rank."""
    from transformers import AutoModelForCausalLM

    from hf_lorafa import chatterbot_pairs

    out = {}
    for task in ("drugreview", "chatterbot"):
        spec = TASKS[task]
        path = resolve_model(spec["model"])
        tokenizer = AutoTokenizer.from_pretrained(path)
        if task == "drugreview":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, use_safetensors=True)
            texts = [r["text"] for r in drugreview_split("train")[:32]]
        else:
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
            texts = [f"{r['question']}\n{r['answer']}" for r in chatterbot_pairs()[:32]]
        batch = tokenizer(texts, truncation=True, max_length=spec["max_length"], padding=True, return_tensors="pt")
        out[spec["model"]] = subspace_variation(model.eval(), dict(batch), spec["r"])
    return out


def frozen_a_scales() -> dict[str, dict[str, float]]:
    """Per task: the median (and range) over adapted layers of z_i's mean square along `frozen_a_init`'s top
    directions over a random direction's, over 4 batches of the first training rows (a run takes 4 shuffled ones)."""
    from hf_lorafa import LoRAFAConfig, adapter_layers, inject_adapters
    from research.accuracy import _data, load_model
    from research.probes import data_directions, direction_scales

    out = {}
    for task in ("drugreview", "chatterbot"):
        spec = TASKS[task]
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec["model"]))
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        train, _, collator = _data(task, tokenizer, spec)
        model = load_model(task, spec).eval()
        model.config.pad_token_id = tokenizer.pad_token_id
        head = ["classifier", "pooler"] if task == "drugreview" else None
        inject_adapters(model, LoRAFAConfig(method="lorafa", r=spec["r"], alpha=spec["alpha"], modules_to_save=head))
        size = spec["batch"]
        batches = [collator([train[i] for i in range(b * size, (b + 1) * size)]) for b in range(4)]
        layers = adapter_layers(model)
        entry = {}
        for kind in ("gradient", "activations"):
            directions = data_directions(model, layers, batches, kind, lambda m, b: m(**b).loss)
            ratios = [
                float((along / random).mean())
                for along, random in direction_scales(model, layers, batches, directions).values()
            ]
            entry[kind] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        out[spec["model"]] = entry
    return out


def main() -> None:
    import sys

    path_out = RESULTS.parent / "drugreview-probe.json"
    if sys.argv[1:] == ["--only", "frozen_a"]:
        torch.manual_seed(0)
        result = json.loads(path_out.read_text())
        result["frozen_a"] = frozen_a_scales()
        path_out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["frozen_a"], indent=1))
        return
    torch.manual_seed(0)
    path = resolve_model(TASKS["drugreview"]["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, use_safetensors=True).eval()
    train, test = drugreview_split("train"), drugreview_split("test")
    length = TASKS["drugreview"]["max_length"]
    f_train, f_test = features(model, tokenizer, train, length), features(model, tokenizer, test, length)
    y_train = torch.tensor([r["label"] for r in train])
    y_test = [r["label"] for r in test]
    result = {}
    for kind in f_train:
        probes = {}
        for l2 in (1e-1, 1e-2, 1e-3):
            logits = probe(f_train[kind], y_train, f_test[kind], l2)
            metrics = classification_metrics((logits.numpy(), y_test))
            probes[f"{l2:g}"] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
        result[kind] = {
            "spread": float(f_train[kind].std(0).mean()),
            "norm": float(f_train[kind].norm(dim=1).mean()),
            "probe": probes,
        }
    result["spectrum"] = {
        TASKS[t]["model"]: top_singular_values(TASKS[t]["model"]) for t in ("drugreview", "chatterbot")
    }
    result["subspace"] = subspaces()
    result["frozen_a"] = frozen_a_scales()
    path_out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
