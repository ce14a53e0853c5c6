"""Predict training memory before training: weights, gradients, optimizer states and activations per method.

The activation model counts what autograd keeps in stock transformers' Llama block (`modeling_llama.py`, SDPA
attention), per token, with frozen linear layers keeping nothing (their backward needs only the weight):

* each RMSNorm keeps its input in float32 and `rsqrt(variance)` (one float per token);
* attention keeps the rotated q and k, v (at key/value-head width, GQA is not expanded), the output, and the
  float32 log-sum-exp per head; cos/sin once per sequence;
* the SwiGLU MLP keeps `gate`, `silu(gate)` and `up`;
* the loss keeps float32 log-probabilities over the vocabulary and the int64 labels.

Mixture-of-Experts blocks (Qwen3-MoE, Mixtral) replace the MLP's linear layers by a router and stacked expert
parameters: each token's k routed copies keep what the SwiGLU MLP keeps, plus its output and the float32 router
logits. An adapter on an expert parameter (`target_parameters`, `tuners/param_layers.py`) keeps, for LoRA and LoRA-FA
alike, the routed input of its product and the adapted weight `W + ΔW` itself (see that module's docstring).

Adapters add, per adapted linear layer: LoRA keeps `A·dropout(x)` (r per token) plus its input for A's gradient
— with dropout, its own `dropout(x)` and the mask (in the activation dtype on CPU, one byte on CUDA); LoRA-FA and
LaMDA keep only `z = A·dropout(x)`, r float32 values per token (the mask is regenerated from a seed). Full
fine-tuning adds the inputs of every linear layer and of the norms' weights. Adapters are float32 (as PEFT's).

With `activation_savers` the count is what hf-lorafa's savers leave (`training/activation_savers.py`): norms keep
their input in the model dtype, SwiGLU its gate and up, the chunked loss the hidden states' gradient; with block
recompute, each attention and dense MLP block its input and only the output projections' adapters their own.

The step's peak is `overhead + weights + optimizer states + max(activations + loss transient, gradients)`:
gradients grow while activations are freed in backward; the loss transient is the logits and the two float32
vocabulary-sized gradients of the cross-entropy. `overhead` is the process's own memory (interpreter, torch,
kernels): measure it in the process that will train (`hf-lorafa estimate` uses its own resident memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..tuners.config import LoRAFAConfig
from ..tuners.injection import adapter_layers, find_target_modules, matches_targets
from ..tuners.layers import layer_features
from ..tuners.methods import METHODS as ADAPTER_METHODS
from .measure import current_rss_bytes, format_bytes

METHODS = ("none", "full", *ADAPTER_METHODS)
OPTIMIZER_STATES = {"adamw": 2.0, "adamw-8bit": 0.5, "sgd": 0.0}  # state bytes per trainable parameter byte
_NF4_BYTES = 0.5 + 4 / 64  # packed 4-bit values plus one float32 absmax per block of 64
LOSS_CHUNK_ELEMENTS = 1 << 23  # training.chunked_loss's logits per chunk (a test keeps the two equal)


@dataclass
class MemoryEstimate:
    """Predicted bytes of one training step; `peak` is what the step's high-water mark should reach."""

    method: str
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    loss_transient: int
    overhead: int
    trainable_parameters: int
    total_parameters: int

    @property
    def peak(self) -> int:
        return (
            self.overhead
            + self.weights
            + self.optimizer_states
            + max(self.activations + self.loss_transient, self.gradients)
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak": self.peak}

    def table(self) -> str:
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer_states),
            ("activations (saved for backward)", self.activations),
            ("loss transient (logits + their gradients)", self.loss_transient),
            ("process overhead", self.overhead),
            ("peak = overhead + weights + states + max(act + transient, grads)", self.peak),
        ]
        lines = [f"{'':<66}{'bytes':>14}  human", "-" * 92]
        lines += [f"{name:<66}{n:>14}  {format_bytes(n)}" for name, n in rows]
        lines.append(f"trainable parameters: {self.trainable_parameters:,} of {self.total_parameters:,}")
        return "\n".join(lines)


def process_overhead(warm: Callable[[], None] | None = None) -> int:
    """Resident bytes of this process once torch has trained something: the peak's model-independent part.

    A throwaway two-layer Llama takes one forward/backward first, so the libraries, kernels and thread pools a
    training step loads lazily are counted here rather than attributed to the model.

    Args:
        warm (`Callable[[], None]`, *optional*):
            A further throwaway step to take before measuring, e.g. a configuration's own step on a model it then
            drops: the kernels generated for its shapes (oneDNN's, on CPU) and the code paths of its adapters and
            savers then count as overhead too. Defaults to none.
    """
    import gc

    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    ids = torch.zeros(1, 8, dtype=torch.long)
    for dtype in (torch.float32, torch.bfloat16):
        tiny.to(dtype)(input_ids=ids, labels=ids).loss.backward()
    del tiny
    if warm is not None:
        warm()
    gc.collect()
    return current_rss_bytes()


def model_config(config_or_model: Any):
    if isinstance(config_or_model, nn.Module):
        return config_or_model.config
    if isinstance(config_or_model, str):
        from transformers import AutoConfig

        from ..data.offline import resolve_model

        return AutoConfig.from_pretrained(resolve_model(config_or_model))
    return config_or_model


def _sparse_layers(config) -> int:
    """How many blocks are MoE blocks (Qwen3-MoE may keep dense MLPs: `mlp_only_layers`, `decoder_sparse_step`)."""
    if not _experts(config):
        return 0
    step, dense = getattr(config, "decoder_sparse_step", 1) or 1, set(getattr(config, "mlp_only_layers", []) or [])
    return sum(i not in dense and (i + 1) % step == 0 for i in range(config.num_hidden_layers))


def _experts(config) -> int:
    return getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0


def _model_linears(config_or_model: Any) -> list[tuple[int, int]] | None:
    """`(d_in, d_out)` of every layer a model adapts (or would: `all-linear`), read from its modules so that
    transformers' Conv1D (GPT-2, weight stored `(in, out)`) counts the right way round; None for a config."""
    if not isinstance(config_or_model, nn.Module):
        return None
    layers = adapter_layers(config_or_model) or find_target_modules(config_or_model, LoRAFAConfig())
    return [
        layer_features(layer) for layer in layers.values() if hasattr(layer, "in_features") or hasattr(layer, "nx")
    ]


def _shape(config, linears: list[tuple[int, int]] | None = None) -> dict[str, int]:
    # A model's own layers give the MLP width (its widest layer input) where the config has no `intermediate_size`.
    needed = ("hidden_size", "num_hidden_layers", "vocab_size") + (() if linears else ("intermediate_size",))
    missing = [k for k in needed if not hasattr(config, k)]
    if missing:
        raise ValueError(
            f"`config_or_model` has no {', '.join(missing)}; estimate_memory models Llama-family decoders "
            "(Llama, Mistral, Qwen2, SmolLM): pass one of their configs, a model, or a Hub id / local folder."
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "H": config.hidden_size,
        "I": getattr(config, "intermediate_size", None) or max(i for i, _ in linears),
        "L": config.num_hidden_layers,
        "V": config.vocab_size,
        "nh": heads,
        "nkv": getattr(config, "num_key_value_heads", None) or heads,
        "hd": head_dim,
        "tied": int(bool(getattr(config, "tie_word_embeddings", False))),
        "E": _experts(config),
        "k": getattr(config, "num_experts_per_tok", 0) or 0,
        "Im": getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", 0),
        "Ls": _sparse_layers(config),
    }


def _linears(s: dict[str, int], sparse: bool = False) -> list[tuple[int, int]]:
    """(d_in, d_out) of every linear layer in one block, in q, k, v, o, gate, up, down order (no MLP in MoE blocks)."""
    q, kv = s["nh"] * s["hd"], s["nkv"] * s["hd"]
    attention = [(s["H"], q), (s["H"], kv), (s["H"], kv), (q, s["H"])]
    return attention if sparse else attention + [(s["H"], s["I"]), (s["H"], s["I"]), (s["I"], s["H"])]


def _expert_parameters(s: dict[str, int], target_parameters: list[str] | None) -> list[tuple[int, int]]:
    """(d_in, d_out) per expert of each expert parameter of one MoE block that `target_parameters` selects."""
    shapes = {"gate_up_proj": (s["H"], 2 * s["Im"]), "down_proj": (s["Im"], s["H"])}
    wanted = target_parameters or []
    return [dims for name, dims in shapes.items() if matches_targets(f"model.layers.0.mlp.experts.{name}", wanted)]


def estimate_memory(
    config_or_model: Any,
    method: str,
    batch: int,
    seq: int,
    r: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    load_in_4bit: bool = False,
    optimizer: str = "adamw",
    dropout: float = 0.0,
    device: str = "cpu",
    overhead: int = 0,
    target_parameters: list[str] | None = None,
    activation_savers: bool = False,
    block_recompute: bool | str = False,
) -> MemoryEstimate:
    """Predict one training step's memory for a Llama-family model (dense or MoE) with adapters on all linear layers.

    Args:
        config_or_model (`PretrainedConfig`, `nn.Module` or `str`):
            The model's config, the model, or a Hub id / local folder / built-in name (`smollm2`). A dense model's
            adapted (or, without adapters, `all-linear`) layers are read from it, so other families' layers (GPT-2's
            Conv1D) count exactly; the activation floor stays the Llama block's.
        method (`str`):
            `"lora"`, `"lorafa"`, `"lamda"`, `"lamda++"`, `"full"` (full fine-tuning) or `"none"` (all frozen,
            gradient flowing to the inputs: the floor).
        batch (`int`), seq (`int`):
            Sequences per step and tokens per sequence.
        r (`int`, *optional*, defaults to `16`):
            Adapter rank (LaMDA++: the mean rank; the budget sums to the same total).
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`):
            Weight and activation dtype (the compute dtype under 4-bit).
        load_in_4bit (`bool`, *optional*, defaults to `False`):
            NF4 linear weights in the blocks (the output head and embeddings stay in `dtype`).
        optimizer (`str`, *optional*, defaults to `"adamw"`):
            `"adamw"` (two states), `"adamw-8bit"` or `"sgd"` (none).
        dropout (`float`, *optional*, defaults to `0.0`):
            Adapter dropout; changes what LoRA keeps, not LoRA-FA/LaMDA.
        device (`str`, *optional*, defaults to `"cpu"`):
            `"cpu"` or `"cuda"`: dropout masks are kept in the activation dtype on CPU, as bytes on CUDA.
        overhead (`int`, *optional*, defaults to `0`):
            The training process's memory before the model exists (measure it there; 0 for GPU memory).
        target_parameters (`list[str]`, *optional*):
            Expert parameters of MoE blocks adapted too (`["gate_up_proj", "down_proj"]`), as `LoRAFAConfig`'s.
        activation_savers (`bool`, *optional*, defaults to `False`):
            Count what `LoRAFATrainingArguments.activation_savers` keeps instead of the stock block's: each RMSNorm
            its input in `dtype`, SwiGLU its gate and up, the chunked loss the hidden states' gradient.
        block_recompute (`bool` or `str`, *optional*, defaults to `False`):
            With `activation_savers`, as `LoRAFATrainingArguments.block_recompute`: `"all"` (or `True`), `"attention"`,
            `"mlp"` or `"none"` (or `False`). Each such block (attention; dense MLP) keeps only its input and the
            adapters inside it keep nothing; backward replays one block at a time (then `loss_transient` is the
            larger of one block's replay and one loss chunk).

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> from hf_lorafa.memory.estimate import estimate_memory
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    ...                   num_key_value_heads=2, vocab_size=256)
    >>> est = estimate_memory(cfg, "lorafa", batch=2, seq=32, r=4)
    >>> est.activations < estimate_memory(cfg, "lora", batch=2, seq=32, r=4, dropout=0.05).activations
    True
    ```
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(METHODS)}; got {method!r}.")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"`optimizer` must be one of {', '.join(OPTIMIZER_STATES)}; got {optimizer!r}.")
    if load_in_4bit and method == "full":
        raise ValueError("`method`='full' cannot train 4-bit weights; drop `load_in_4bit` or pick an adapter method.")
    model_linears = _model_linears(config_or_model)
    s = _shape(model_config(config_or_model), model_linears)
    b = torch.finfo(dtype).bits // 8
    H, I, L, V, N = s["H"], s["I"], s["L"], s["V"], batch * seq  # noqa: E741  (the papers' names)
    Ls, E, k, Im = s["Ls"], s["E"], s["k"], s["Im"]
    blocks = [(L - Ls, _linears(s)), (Ls, _linears(s, sparse=True))]  # (how many blocks, their linear layers)
    if model_linears and not Ls:
        blocks = [(1, model_linears)]  # a dense model's own layers, all of them at once
    linear_numel = sum(n * sum(i * o for i, o in linears) for n, linears in blocks)
    other_numel = V * H * (2 - s["tied"]) + (2 * L + 1) * H + Ls * E * (3 * H * Im + H)  # + experts and routers
    base_bytes = int(linear_numel * (_NF4_BYTES if load_in_4bit else b)) + other_numel * b
    experts = _expert_parameters(s, target_parameters) if Ls else []

    def per_layer_sum(count) -> int:
        """`count(d_in, d_out, r)` summed over every adapted linear layer and (per expert) expert parameter."""
        layers = sum(n * sum(count(i, o, r) for i, o in linears) for n, linears in blocks)
        return layers + Ls * E * sum(count(i, o, r) for i, o in experts)

    # Adapter parameters (float32) and what is trained at the step's peak (LaMDA trains B early, then S only).
    adapter = ADAPTER_METHODS.get(method)
    adapter_numel = per_layer_sum(adapter.adapter_numel) if adapter else 0
    if method == "full":
        trainable_bytes, trainable = (linear_numel + other_numel) * b, linear_numel + other_numel
    else:
        trainable = per_layer_sum(adapter.trainable_numel) if adapter else 0
        trainable_bytes = 4 * trainable

    # Activations: the frozen floor, then what each method adds (see the module docstring for the count).
    attention = (2 * s["nh"] * s["hd"] + 2 * s["nkv"] * s["hd"]) * b + 4 * s["nh"]
    moe = Ls * (k * (3 * Im + H) * b + 4 * E)
    which = {True: "all", False: "none"}.get(block_recompute, block_recompute)
    if which not in ("none", "all", "attention", "mlp"):
        raise ValueError(f"`block_recompute` must be 'none', 'all', 'attention' or 'mlp'; got {block_recompute!r}.")
    which = which if activation_savers else "none"
    replay_attention, replay_mlp = which in ("all", "attention"), which in ("all", "mlp")
    recompute = replay_attention or replay_mlp
    kept = blocks  # the adapted layers whose adapters keep something for backward
    if recompute:  # the layers inside the replayed spans keep nothing (q, k, v; gate, up)
        inside = ({0, 1, 2} if replay_attention else set()) | ({4, 5} if replay_mlp else set())
        dense, sparse = _linears(s), _linears(s, sparse=True)
        kept = [(L - Ls, [d for i, d in enumerate(dense) if i not in inside])]
        kept += [(Ls, [d for i, d in enumerate(sparse) if i not in inside])]
    if not activation_savers:
        per_token = L * (2 * (4 * H + 4) + attention) + (L - Ls) * 3 * I * b + moe + (4 * H + 4) + 4 * V + 8
        transient = N * V * (b + 8)
    else:
        # Each norm's input (with block recompute: each block's input), the final norm's, the chunked loss's
        # hidden-state gradient; one chunk's logits and float32 log-probabilities at a time.
        per_token = L * 2 * H * b + moe + 2 * H * b
        swiglu = 2 * I * b * (L > Ls)
        per_token += (not replay_attention) * L * attention + (not replay_mlp) * (L - Ls) * 2 * I * b
        transient = min(N, max(1, LOSS_CHUNK_ELEMENTS // V)) * V * (b + 4)
        if recompute:  # one block replayed: its norm's input, attention or gate, up and act, its adapters' z
            replay = H * b + max(attention * replay_attention, swiglu * 3 // 2 * replay_mlp) + 3 * r * 4
            transient = max(transient, N * replay)
    per_step = 2 * seq * s["hd"] * b  # cos and sin, shared by every layer and sequence
    adapted = sum(n * len(linears) for n, linears in kept)
    if method == "full":
        per_token += L * (4 * H + I) * b + 2 * H * b + 8
    elif adapter is not None and adapter.keeps_input:
        if dropout > 0:
            per_token += sum(n * sum(i for i, _ in ls) for n, ls in kept) * (4 + (4 if device == "cpu" else 1))
        elif b == 4 and not recompute:  # one float32 input per distinct tensor: q/k/v share one, gate/up another
            per_token += (L - Ls) * (2 * H + I) * 4 + Ls * H * 4
        else:  # each layer casts its input to the float32 adapter: a copy per layer
            per_token += sum(n * sum(i for i, _ in ls) for n, ls in kept) * 4
        per_token += adapted * r * 4
    elif method != "none":
        per_token += adapted * r * 4
    if adapter is not None and experts:  # each adapted expert product keeps its routed input and `W + ΔW`
        per_token += Ls * k * sum(i for i, _ in experts) * b
        per_step += Ls * E * sum(i * o for i, o in experts) * b
    activations = N * per_token + per_step + 4
    return MemoryEstimate(
        method=method,
        weights=base_bytes + 4 * adapter_numel,
        gradients=trainable_bytes,
        optimizer_states=int(OPTIMIZER_STATES[optimizer] * trainable_bytes),
        activations=activations,
        loss_transient=transient,
        overhead=overhead,
        trainable_parameters=trainable,
        total_parameters=linear_numel + other_numel + adapter_numel,
    )
