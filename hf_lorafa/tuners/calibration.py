"""A frozen A from the training data (`frozen_a_init="gradient"` or `"activations"`, ours).

LoRA-FA and LaMDA never move A, so A decides for the whole run which input directions the update `ΔW = s·B'A` can
use: B's gradient is `s·G Aᵀ` with `G = Σ_tokens g xᵀ`, the gradient full fine-tuning would give W. A random A keeps
about r/d_in of G's energy. Taking A's rows as G's top-r right singular vectors over a few training batches (at the
adapters' start, where the model is the base model) keeps the most that any rank-r A can, the way LoRA-GA (Wang et
al., 2024, arXiv:2407.05000) and LoRA-SB (Ponkshe et al., 2024, arXiv:2411.19557) start their adapters from the
first gradient's SVD. Neither freezes A as LoRA-FA does; that pairing, and its use for LaMDA's PMA, are ours.

`"activations"` takes the top-r principal directions of the layer's inputs instead, as EVA (Paischer et al., 2024,
arXiv:2410.07170) starts LoRA's A.

Each row is scaled so that its share of `z = A x` has the mean square a random row's has (`A_ROW_NORM² · tr(M)/d_in`,
M the inputs' second moment): Adam moves each entry of B by about the learning rate whatever its gradient, so B's
column i changes the output in proportion to |z_i|, and a top direction of MiniLM's or SmolLM2's inputs carries many
times a random one's mean square. Unscaled, the same learning rate is a far larger step.

Memory: G (d_out×d_in, fp32) or the inputs' covariance (d_in×d_in, fp64) is held for as many layers at a time as fit
in `FROZEN_A_BYTES` (1 GiB), one group of layers per pass over the batches, then a forward-only pass measures the
scale of the chosen directions; every sum is released before training starts. A small model takes one pass, a 7B
one about 25 for the gradient: a one-off cost of some seconds to minutes, with the peak well below a training step's
optimizer state.

The pass runs in eval mode (no dropout, and so no gradient checkpointing: a batch that fits only under checkpointing
needs a smaller `per_device_train_batch_size` for it, or `frozen_a_init="random"`).

The model is unchanged at step 0 whatever A is (B = 0, or LaMDA's offset C = B₀S₀ over the new A). The batches are
taken under `torch.random.fork_rng`, so training draws the same data order and dropout masks as with a random A.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .config import FROZEN_A_INITS
from .injection import adapter_layers
from .layers import A_ROW_NORM, AdapterLayer

# The most bytes of per-layer sums (G or the inputs' covariance) held at once; more layers take more passes.
FROZEN_A_BYTES = 1 << 30
DATA_KINDS = tuple(k for k in FROZEN_A_INITS if k != "random")


def _accumulate(sums: dict[str, list[torch.Tensor]], name: str, *terms: torch.Tensor) -> None:
    """Add `terms` to layer `name`'s running sums in `sums` (the first batch's terms start them)."""
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


def _groups(layers: dict[str, AdapterLayer], nbytes: Callable[[AdapterLayer], int], budget: int) -> list[list[str]]:
    """The layers split in order into groups whose sums fit in `budget` bytes (a larger layer alone in its group)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, layer in layers.items():
        size = nbytes(layer)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _run(
    model: nn.Module,
    layers: dict[str, AdapterLayer],
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
            mask[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
            if loss_fn is None:
                with torch.no_grad():
                    model(**{k: v for k, v in batch.items() if k != "labels"})
            else:
                loss = loss_fn(model, batch)
            names = [n for n in layers if n in inputs]
            if not names:
                raise ValueError("no adapted layer ran in the calibration batch's forward; check the model's inputs.")
            if loss_fn is not None:
                grads = torch.autograd.grad(loss, [probes[n] for n in names], allow_unused=True)
                for name, g in zip(names, grads):
                    if g is not None:
                        x = inputs[name]
                        on_gradient(name, g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))
                del loss, grads
    finally:
        for handle in handles:
            handle.remove()
        inputs.clear()
        probes.clear()


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    """Sum `tensors` over the ranks in place, so that every rank freezes the same A."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in tensors:
            torch.distributed.all_reduce(t)


def data_directions(
    model: nn.Module,
    layers: dict[str, AdapterLayer],
    batches: list,
    kind: str,
    loss_fn: Callable | None = None,
    budget: int | None = None,
) -> dict[str, torch.Tensor]:
    """Each layer's r unit directions (rows, fp64) from `batches`: `"gradient"`, the top right singular vectors of
    `G = Σ g xᵀ`; `"activations"`, the top principal directions of the inputs. A layer the loss never reaches (G = 0)
    is left out. `budget` bytes of sums at a time (`FROZEN_A_BYTES` by default)."""
    budget = FROZEN_A_BYTES if budget is None else budget
    out: dict[str, torch.Tensor] = {}
    if kind == "gradient":
        for group in _groups(layers, lambda m: 4 * m.out_features * m.in_features, budget):
            sums: dict[str, list[torch.Tensor]] = {}

            def add(name, g, x, sums=sums):
                _accumulate(sums, name, g.float().t() @ x.float())

            _run(model, {n: layers[n] for n in group}, batches, None, loss_fn, add)
            for name in group:
                g = sums.pop(name, [None])[0]
                if g is None:  # the loss never reached this layer here (it may on another rank)
                    layer = layers[name]
                    g = torch.zeros(layer.out_features, layer.in_features, device=layer.lora_A.weight.device)
                _all_reduce([g])
                if torch.any(g):
                    out[name] = torch.linalg.svd(g.double(), full_matrices=False)[2][: layers[name].r]
        return out
    for group in _groups(layers, lambda m: 8 * m.in_features * (m.in_features + 1) + 8, budget):
        moments: dict[str, list[torch.Tensor]] = {}

        def add_inputs(name, x, moments=moments):
            x = x.double()
            n = torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device)
            _accumulate(moments, name, x.sum(0), x.t() @ x, n)

        _run(model, {n: layers[n] for n in group}, batches, add_inputs)
        for name in group:
            total, outer, n = moments.pop(name)
            _all_reduce([total, outer, n])
            mean = total / n
            _, vectors = torch.linalg.eigh(outer / n - torch.outer(mean, mean))
            out[name] = vectors[:, -layers[name].r :].flip(-1).t()
    return out


def direction_scales(
    model: nn.Module, layers: dict[str, AdapterLayer], batches: list, directions: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, over the inputs' tokens (padding left out): the mean square of each direction's `v_i·x` and a
    random unit direction's, `‖x‖²/d_in` (one forward-only pass; r + 1 sums a layer)."""
    sums: dict[str, list[torch.Tensor]] = {}

    def add(name, x):
        if name not in directions:
            return
        x = x.double()
        v = directions[name].to(x.device)
        along, norm = (x @ v.t()).square().sum(0), x.square().sum() / x.shape[1]
        _accumulate(sums, name, along, norm, torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device))

    _run(model, layers, batches, add)
    out = {}
    for name, (along, norm, n) in sums.items():
        _all_reduce([along, norm, n])
        out[name] = (along / n, norm / n)
    return out


def init_frozen_a_from_data(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable | None = None,
    kind: str = "gradient",
    budget: int | None = None,
) -> int:
    """Set every frozen A from training batches: `kind="gradient"`, the top-r right singular vectors of the gradient
    full fine-tuning would give W (`G = Σ g xᵀ`); `"activations"`, the inputs' top-r principal directions. Each row
    is scaled so that its `z_i = A_i x` has a random row's mean square over the batches' inputs.

    Args:
        model (`nn.Module`): a model with LoRA-FA, LaMDA or LaMDA++ adapters, as injected (B = 0 or LaMDA's offset).
        batches (`Iterable`): training batches, each a dict of model inputs (with labels for `"gradient"`).
        loss_fn (`Callable`, *optional*): `(model, batch) -> loss`; defaults to `model(**batch).loss`.
        kind (`str`, *optional*, defaults to `"gradient"`): `"gradient"` or `"activations"`.
        budget (`int`, *optional*): bytes of per-layer sums held at once (`FROZEN_A_BYTES`, 1 GiB, by default).

    Returns:
        The number of batches used.

    Example:

    ```python
    >>> import itertools
    >>> from hf_lorafa import LoRAFAConfig, inject_adapters, init_frozen_a_from_data
    >>> model = inject_adapters(model, LoRAFAConfig(method="lorafa", r=16))  # doctest: +SKIP
    >>> init_frozen_a_from_data(model, itertools.islice(train_loader, 4))  # doctest: +SKIP
    4
    ```
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"`kind` must be {' or '.join(map(repr, DATA_KINDS))}; got {kind!r}.")
    layers = {n: m for n, m in adapter_layers(model).items() if not m.lora_A.weight.requires_grad}
    if not layers:
        raise ValueError(
            "`frozen_a_init` sets a frozen A; this model's adapters train A (LoRA). Use method='lorafa', 'lamda' or "
            "'lamda++', or frozen_a_init='random'."
        )
    batches = list(batches)
    if not batches:
        raise ValueError("`frozen_a_init` from the data needs at least one training batch; the data loader gave none.")
    loss_fn = (loss_fn or (lambda m, b: m(**b).loss)) if kind == "gradient" else None
    with _calibrating(model):
        directions = data_directions(model, layers, batches, kind, loss_fn, budget)
    set_frozen_a_directions(model, batches, directions, layers)
    return len(batches)


@contextlib.contextmanager
def _calibrating(model: nn.Module):
    """Eval mode (no dropout: the same A for the same batches) and the global RNG left as it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        model.train(was_training)


def set_frozen_a_directions(
    model: nn.Module,
    batches: Iterable,
    directions: dict[str, torch.Tensor],
    layers: dict[str, AdapterLayer] | None = None,
) -> None:
    """Set each named layer's frozen A to `directions[name]` (r orthonormal rows), each row scaled so that its
    `z_i = A_i x` has a random row's mean square over `batches`' inputs (one forward-only pass).

    `init_frozen_a_from_data` calls it with the data's directions."""
    layers = layers or adapter_layers(model)
    with _calibrating(model):
        scales = direction_scales(model, layers, list(batches), directions)
    for name, rows in directions.items():
        along, random = scales[name]
        factor = A_ROW_NORM * (random / along.clamp_min(1e-30)).sqrt()
        layers[name].set_frozen_a(rows.to(factor.device) * factor[:, None])
    model.hf_lorafa_a_pending = False
