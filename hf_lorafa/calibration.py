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

The model is unchanged at step 0 whatever A is (B = 0, or LaMDA's offset C = B₀S₀ over the new A). The batches are
taken under `torch.random.fork_rng`, so training draws the same data order and dropout masks as with a random A.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .injection import adapter_layers
from .layers import A_ROW_NORM, AdapterLayer


class _Sums:
    """One layer's sums over the calibration tokens (padding left out): Σx, Σ x xᵀ, the count, and G = Σ g xᵀ."""

    def __init__(self) -> None:
        self.total = self.outer = self.grad = None
        self.n = 0

    def add_inputs(self, x: torch.Tensor) -> None:
        x = x.double()
        total, outer = x.sum(0), x.t() @ x
        self.total = total if self.total is None else self.total + total
        self.outer = outer if self.outer is None else self.outer + outer
        self.n += x.shape[0]

    def add_gradient(self, g: torch.Tensor, x: torch.Tensor) -> None:
        term = g.float().t() @ x.float()
        self.grad = term if self.grad is None else self.grad + term


def _tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`t`'s rows, one a token, without the padding where the batch's attention mask matches its shape."""
    if mask is not None and tuple(mask.shape) == tuple(t.shape[:-1]):
        return t[mask.to(t.device).bool()]
    return t.reshape(-1, t.shape[-1])


def _collect(
    model: nn.Module, layers: dict[str, AdapterLayer], batches: Iterable, loss_fn: Callable | None
) -> tuple[dict[str, _Sums], int]:
    """Each layer's `_Sums` over `batches`; G only with a `loss_fn` (g: the loss's gradient at the layer's output)."""
    sums = {name: _Sums() for name in layers}
    inputs: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def keep_input(name):
        def hook(module, args):
            inputs[name] = args[0].detach()

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
    count = 0
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
            for name in names:
                sums[name].add_inputs(_tokens(inputs[name], mask[0]))
            if loss_fn is not None:
                grads = torch.autograd.grad(loss, [probes[n] for n in names], allow_unused=True)
                for name, g in zip(names, grads):
                    if g is not None:
                        x = inputs[name]
                        sums[name].add_gradient(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        inputs.clear()
        probes.clear()
    if count == 0:
        raise ValueError("`frozen_a_init` from the data needs at least one training batch; the data loader gave none.")
    return sums, count


def _directions(sums: _Sums, r: int, kind: str) -> torch.Tensor | None:
    """The r unit directions (rows) A spans: G's top right singular vectors, or the inputs' top principal ones."""
    if kind == "gradient":
        if sums.grad is None or not torch.any(sums.grad):
            return None  # a layer the loss does not reach: keep its random A
        return torch.linalg.svd(sums.grad.double(), full_matrices=False)[2][:r]
    mean = sums.total / sums.n
    _, vectors = torch.linalg.eigh(sums.outer / sums.n - torch.outer(mean, mean))
    return vectors[:, -r:].flip(-1).t()


def scaled_rows(directions: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """`directions` (orthonormal rows) scaled so each row's z_i has a random row's mean square over the inputs whose
    second moment is `second_moment`: `A_ROW_NORM² · tr(M)/d_in`."""
    along = torch.einsum("ij,jk,ik->i", directions, second_moment, directions).clamp_min(1e-30)
    target = torch.trace(second_moment) / second_moment.shape[0]
    return directions * (A_ROW_NORM * (target / along).sqrt())[:, None]


def init_frozen_a_from_data(
    model: nn.Module, batches: Iterable, loss_fn: Callable | None = None, kind: str = "gradient"
) -> int:
    """Set every frozen A from training batches: `kind="gradient"`, G's top-r right singular vectors; `"activations"`,
    the inputs' top-r principal directions. Each row scaled as `scaled_rows` says.

    Args:
        model (`nn.Module`): a model with LoRA-FA, LaMDA or LaMDA++ adapters, as injected (B = 0 or LaMDA's offset).
        batches (`Iterable`): training batches, each a dict of model inputs (with labels for `"gradient"`).
        loss_fn (`Callable`, *optional*): `(model, batch) -> loss`; defaults to `model(**batch).loss`.
        kind (`str`, *optional*, defaults to `"gradient"`): `"gradient"` or `"activations"`.

    Returns:
        The number of batches used.
    """
    if kind not in ("gradient", "activations"):
        raise ValueError(f"`kind` must be 'gradient' or 'activations'; got {kind!r}.")
    layers = {n: m for n, m in adapter_layers(model).items() if not m.lora_A.weight.requires_grad}
    if not layers:
        raise ValueError(
            "`frozen_a_init` sets a frozen A; this model's adapters train A (LoRA). Use method='lorafa', 'lamda' or "
            "'lamda++', or frozen_a_init='random'."
        )
    if kind == "gradient":
        loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    else:
        loss_fn = None
    was_training = model.training
    model.eval()  # no dropout: the same A for the same batches
    try:
        with torch.random.fork_rng(devices=[]):
            sums, count = _collect(model, layers, batches, loss_fn)
    finally:
        model.train(was_training)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    for name, layer in layers.items():
        acc = sums[name]
        if acc.n == 0:
            continue
        if distributed:  # every rank must freeze the same A
            for t in (acc.total, acc.outer) + ((acc.grad,) if acc.grad is not None else ()):
                torch.distributed.all_reduce(t)
            n = torch.tensor(float(acc.n), device=acc.total.device)
            torch.distributed.all_reduce(n)
            acc.n = int(n.item())
        directions = _directions(acc, layer.r, kind)
        if directions is not None:
            layer.set_frozen_a(scaled_rows(directions, acc.outer / acc.n))
    return count
