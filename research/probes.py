"""The data's directions at each adapter layer, from hf_lorafa's public pieces (the lab's own copy).

What `frozen_a_init="gradient"` / `"activations"` computes inside the library, spelled out over `adapter_layers` and
the layers' `lora_A` so that the experiments can also measure directions no option sets (LoRA's own first turn,
LoRA's learned row space) and freeze any of them: one pass over a few training batches with hooks on the adapter
layers, each layer's inputs (padding left out) and, with a loss, the loss's gradient at its output. Sums are held for
every layer at once (the library splits them into groups under a memory budget; the lab's models are small) and
nothing is reduced over ranks (the experiments run in one process).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from hf_lorafa import adapter_layers

# How many training batches a frozen A is set from, as the trainer takes them for `frozen_a_init`.
FROZEN_A_BATCHES = 4


def frozen_a_batches(trainer, count: int = FROZEN_A_BATCHES) -> list[dict]:
    """The first `count` batches of `trainer`'s training data loader, on the model's device."""
    device = trainer.args.device
    return [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for batch in itertools.islice(trainer.get_train_dataloader(), count)
    ]


@contextlib.contextmanager
def calibrating(model: nn.Module):
    """Eval mode (no dropout: the same directions for the same batches) and the global RNG left as it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        model.train(was_training)


def _add(sums: dict[str, list[torch.Tensor]], name: str, *terms: torch.Tensor) -> None:
    if name not in sums:
        sums[name] = list(terms)
    else:
        for acc, term in zip(sums[name], terms):
            acc.add_(term)


def _tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`t`'s rows, one a token, without the padding where the batch's attention mask matches its shape."""
    if mask is not None and tuple(mask.shape) == tuple(t.shape[:-1]):
        return t[mask.to(t.device).bool()]
    return t.reshape(-1, t.shape[-1])


def calibration_pass(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list,
    on_inputs: Callable[[str, torch.Tensor], None] | None,
    loss_fn: Callable | None = None,
    on_gradient: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> None:
    """One pass over `batches`: each layer's inputs (padding left out) to `on_inputs`; with a `loss_fn`, the loss's
    gradient at each layer's output and the layer's inputs (every token, as G sums them) to `on_gradient`."""
    inputs: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def keep_input(name):
        def hook(module, args):
            inputs[name] = args[0].detach()
            if on_inputs is not None:
                on_inputs(name, _tokens(inputs[name], mask[0]))

        return hook

    def add_probe(name):
        # out + 0: the zero's gradient is the output's, and the graph upstream stays whole.
        def hook(module, args, out):
            probes[name] = torch.zeros_like(out, requires_grad=True)
            return out + probes[name]

        return hook

    handles = [layer.register_forward_pre_hook(keep_input(name)) for name, layer in layers.items()]
    if loss_fn is not None:
        handles += [layer.register_forward_hook(add_probe(name)) for name, layer in layers.items()]
    try:
        for batch in batches:
            inputs.clear()
            probes.clear()
            mask[0] = batch.get("attention_mask")
            if loss_fn is None:
                with torch.no_grad():
                    model(**{k: v for k, v in batch.items() if k != "labels"})
                continue
            loss = loss_fn(model, batch)
            names = [n for n in layers if n in inputs]
            grads = torch.autograd.grad(loss, [probes[n] for n in names], allow_unused=True)
            for name, g in zip(names, grads):
                if g is not None:
                    x = inputs[name]
                    on_gradient(name, g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))
            del loss, grads
    finally:
        for handle in handles:
            handle.remove()


def data_directions(
    model: nn.Module, layers: dict[str, nn.Module], batches: list, kind: str, loss_fn: Callable | None = None
) -> dict[str, torch.Tensor]:
    """Each layer's r unit directions (rows, fp64): `"gradient"`, the top right singular vectors of `G = Σ g xᵀ`
    (a layer the loss never reaches is left out); `"activations"`, the top principal directions of the inputs."""
    sums: dict[str, list[torch.Tensor]] = {}
    if kind == "gradient":
        calibration_pass(
            model, layers, batches, None, loss_fn, lambda n, g, x: _add(sums, n, g.float().t() @ x.float())
        )
        return {
            name: torch.linalg.svd(g.double(), full_matrices=False)[2][: layers[name].r]
            for name, (g,) in sums.items()
            if torch.any(g)
        }

    def add_inputs(name, x):
        x = x.double()
        _add(sums, name, x.sum(0), x.t() @ x, torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device))

    calibration_pass(model, layers, batches, add_inputs)
    out = {}
    for name, (total, outer, n) in sums.items():
        mean = total / n
        vectors = torch.linalg.eigh(outer / n - torch.outer(mean, mean))[1]
        out[name] = vectors[:, -layers[name].r :].flip(-1).t()
    return out


def direction_scales(
    model: nn.Module, layers: dict[str, nn.Module], batches: list, directions: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, over the inputs' tokens (padding left out): the mean square of each direction's `v_i·x` and a
    random unit direction's, `‖x‖²/d_in` (one forward-only pass)."""
    sums: dict[str, list[torch.Tensor]] = {}

    def add(name, x):
        if name in directions:
            x = x.double()
            v = directions[name].to(x.device)
            n = torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device)
            _add(sums, name, (x @ v.t()).square().sum(0), x.square().sum() / x.shape[1], n)

    calibration_pass(model, layers, batches, add)
    return {name: (along / n, norm / n) for name, (along, norm, n) in sums.items()}


def set_frozen_a_directions(
    model: nn.Module, batches: Iterable, directions: dict[str, torch.Tensor], layers: dict | None = None
) -> None:
    """Set each named layer's frozen A to `directions[name]` (r orthonormal rows), each row scaled so that its
    `z_i = A_i x` has the mean square a row of the layer's random A has over `batches`' inputs (the rows of a random
    A share one norm, read from the layer before it is replaced)."""
    layers = layers or adapter_layers(model)
    with calibrating(model):
        scales = direction_scales(model, layers, list(batches), directions)
    for name, rows in directions.items():
        along, random = scales[name]
        norms = layers[name].lora_A.weight.detach().double().norm(dim=1)
        if not torch.allclose(norms, norms[0], rtol=1e-4):
            raise ValueError(
                f"{name}: its A's rows differ in norm; set the directions over a random A, before training."
            )
        row_norm = norms[0].to(along.device)
        factor = row_norm * (random / along.clamp_min(1e-30)).sqrt()
        layers[name].set_frozen_a(rows.to(factor.device) * factor[:, None])
