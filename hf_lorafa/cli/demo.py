"""The Gradio demo (`hf-lorafa demo`, `spaces_demo/app.py`): try fine-tuned adapters before sharing them.

The base model is loaded once (safetensors only, no remote code); each adapter is loaded into its own deep copy of
the base and merged (`merge_adapters`), so every choice on the page is a plain model served at base-model speed and
requests for different adapters run side by side without swapping weights under a lock. For small models (SmolLM2-
135M: ~0.5 GB per fp32 copy) that memory is the cheap side of the trade.

The page offers streaming generation (chat template when the tokenizer has one, plain completion otherwise), a
selector for the base vs each adapter, a side-by-side comparison and each adapter's card facts from `hf_lorafa.json`.
`/generate` is the API endpoint for `gradio_client` users: `Client(url).predict("Hello", api_name="/generate")`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from threading import Thread
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402
from torch import nn  # noqa: E402

try:
    import gradio as gr  # noqa: E402
except ImportError as err:  # the demo is an optional extra
    raise ImportError("The demo needs gradio: pip install 'hf-lorafa[demo]'") from err

from .demo_models import BASE, Served, facts_markdown, load_models  # noqa: E402

DEFAULT_ADAPTER_DIR = "outputs/smollm2-lorafa"  # where `hf-lorafa train` writes by default (relative to cwd)
MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 256
CONCURRENCY_LIMIT = 2  # generations at once; more only slows each one down on a few CPU cores
QUEUE_SIZE = 64  # waiting requests beyond this are refused with "queue is full" instead of piling up
STREAM_TIMEOUT_S = 120.0  # a generation that produces nothing for this long is reported, not waited on forever


def encode(tokenizer: Any, prompt: str) -> dict[str, torch.Tensor]:
    """Chat template (one user turn, generation prompt added) when the tokenizer has one, plain text otherwise."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    return tokenizer(prompt, return_tensors="pt")


def stream_generate(
    model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, temperature: float
) -> Iterator[str]:
    """Yield the growing completion of `prompt` as `model.generate` produces it (in a worker thread)."""
    from transformers import TextIteratorStreamer

    inputs = {k: v.to(model.device) for k, v in encode(tokenizer, prompt).items()}
    context = getattr(model.config, "max_position_embeddings", None)
    if context and inputs["input_ids"].shape[1] + max_new_tokens > context:
        raise gr.Error(
            f"The prompt is {inputs['input_ids'].shape[1]} tokens; with max_new_tokens={max_new_tokens} that exceeds "
            f"the model's context of {context} tokens. Shorten the prompt or lower max_new_tokens."
        )
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(
                    **inputs, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad, **sampling
                )
        except Exception as err:  # reported to the page below; the thread must still end the stream
            failures.append(err)
            streamer.end()

    Thread(target=run, daemon=True).start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    if failures:
        raise gr.Error(f"Generation failed: {type(failures[0]).__name__}: {failures[0]}")
    if not text:  # the model ended at once: still answer, with an empty text
        yield text


def check_request(prompt: str, max_new_tokens: float, temperature: float, limits: tuple[int, int]) -> None:
    """Refuse, with a message that says the limit, what the server will not run."""
    max_chars, max_tokens = limits
    if not prompt or not prompt.strip():
        raise gr.Error("The prompt is empty; type something to continue.")
    if len(prompt) > max_chars:
        raise gr.Error(f"The prompt is {len(prompt)} characters; the limit is {max_chars}. Shorten it.")
    if not 1 <= max_new_tokens <= max_tokens:
        raise gr.Error(f"max_new_tokens must be a whole number between 1 and {max_tokens}; got {max_new_tokens}.")
    if not 0 <= temperature <= 2:
        raise gr.Error(f"temperature must be a number between 0 and 2; got {temperature}.")


def checked_slider(slider: gr.Slider, name: str, whole: bool) -> gr.Slider:
    """`slider` refusing a value that is not a finite number (`"nan"`, `"inf"`, text) with the limit message.

    Gradio's own `Slider.preprocess` compares and rounds the raw API value first, so such a value raised a bare
    TypeError/ValueError there, which the client sees as a hidden error (`error: null`), before our checks ran.
    """
    original = slider.preprocess
    kind = "a whole number" if whole else "a number"
    limit = f"{name} must be {kind} between {slider.minimum:g} and {slider.maximum:g}"

    def preprocess(payload: Any) -> float:
        try:
            value = float(payload)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(payload, bool) or not math.isfinite(value) or (whole and not value.is_integer()):
            raise gr.Error(f"{limit}; got {payload!r}.")
        return original(value)

    slider.preprocess = preprocess  # on this instance only: the page and API schema stay a plain slider
    return slider


def build_demo(
    tokenizer: Any,
    models: dict[str, Served],
    *,
    title: str = "hf-lorafa demo",
    max_prompt_chars: int = MAX_PROMPT_CHARS,
    max_new_tokens: int = MAX_NEW_TOKENS,
    concurrency_limit: int = CONCURRENCY_LIMIT,
) -> gr.Blocks:
    """The page and its API (`/generate`, `/compare`) over models from [`load_models`]; call `.launch()` on it.

    Example:

    ```python
    >>> demo = build_demo(*load_models("smollm2", ["outputs/smollm2-lorafa"]))  # doctest: +SKIP
    >>> demo.launch(server_name="127.0.0.1", server_port=7860)  # doctest: +SKIP
    ```
    """
    names, adapters = list(models), [n for n in models if n != BASE]
    limits, default_tokens = (max_prompt_chars, max_new_tokens), min(64, max_new_tokens)

    def served(choice: str) -> Served:
        if choice not in models:  # the page only sends names; never a path
            raise gr.Error(f"Unknown model {choice!r}; choose one of {names}.")
        return models[choice]

    def generate(prompt: str, model: str = names[-1], new_tokens: float = default_tokens, temperature: float = 0.7):
        check_request(prompt, new_tokens, temperature, limits)
        yield from stream_generate(served(model).model, tokenizer, prompt, int(new_tokens), float(temperature))

    def compare(prompt: str, adapter: str | None = None, new_tokens: float = default_tokens, temperature: float = 0.7):
        check_request(prompt, new_tokens, temperature, limits)
        chosen = served(adapter or names[-1])
        base_text = ""
        for base_text in stream_generate(models[BASE].model, tokenizer, prompt, int(new_tokens), float(temperature)):
            yield base_text, ""
        for text in stream_generate(chosen.model, tokenizer, prompt, int(new_tokens), float(temperature)):
            yield base_text, text

    def controls(tab: str, choices: list[str], label: str) -> tuple[list[gr.components.Component], list]:
        """Model picker, prompt, limits and button, with the chosen model's card facts beside them."""
        with gr.Row():
            with gr.Column(scale=3):
                choice = gr.Dropdown(choices, value=choices[-1], label=label, elem_id=f"{tab}-model")
                info = f"At most {max_prompt_chars} characters."
                prompt = gr.Textbox(label="Prompt", lines=3, info=info, elem_id=f"{tab}-prompt")
                with gr.Row():
                    tokens = gr.Slider(1, max_new_tokens, value=default_tokens, step=1, label="Max new tokens")
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                    checked_slider(tokens, "max_new_tokens", whole=True)
                    checked_slider(temperature, "temperature", whole=False)
                button = gr.Button(tab.title(), variant="primary", elem_id=f"{tab}-btn")
            with gr.Column(scale=2):
                facts = gr.Markdown(facts_markdown(models[choices[-1]]), elem_id=f"{tab}-facts")
        choice.change(lambda c: facts_markdown(served(c)), choice, facts, api_visibility="private")
        return [prompt, choice, tokens, temperature], [button.click, prompt.submit]

    queued = {"concurrency_limit": concurrency_limit, "concurrency_id": "generation"}
    mode = "chat template" if getattr(tokenizer, "chat_template", None) else "plain completion"
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nBase model plus {len(adapters)} merged adapter(s); prompts use the {mode}.")
        with gr.Tab("Generate"):
            inputs, triggers = controls("generate", names, "Model")
            output = gr.Textbox(label="Output", lines=8, interactive=False, elem_id="output")
            gr.on(triggers, generate, inputs, output, api_name="generate", **queued)
        if adapters:
            with gr.Tab("Compare"):
                inputs, triggers = controls("compare", adapters, "Adapter")
                with gr.Row():
                    base_out = gr.Textbox(label="Base model", lines=8, interactive=False, elem_id="compare-base")
                    adapter_out = gr.Textbox(label="Adapter", lines=8, interactive=False, elem_id="compare-adapter")
                gr.on(triggers, compare, inputs, [base_out, adapter_out], api_name="compare", **queued)
    return demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=concurrency_limit)


def _split(value: str | None) -> list[str]:
    return [part for part in re.split(r"[,\s]+", value or "") if part]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hf-lorafa demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base-model",
        default=os.environ.get("HF_LORAFA_BASE_MODEL", "smollm2"),
        help="Base model folder or Hub id (env HF_LORAFA_BASE_MODEL; default: the embedded SmolLM2-135M-Instruct).",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        dest="adapters",
        help=f"Adapter folder or Hub id; repeat for several (env HF_LORAFA_ADAPTERS, comma/space separated; "
        f"default: {DEFAULT_ADAPTER_DIR} if it exists).",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--device", default="cpu", help="Torch device, e.g. cpu or cuda.")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="Largest max_new_tokens allowed.")
    parser.add_argument("--max-prompt-chars", type=int, default=MAX_PROMPT_CHARS, help="Longest prompt allowed.")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY_LIMIT, help="Generations run at once.")
    args = parser.parse_args(argv)
    if args.adapters is None:
        args.adapters = _split(os.environ.get("HF_LORAFA_ADAPTERS"))
        if not args.adapters and "HF_LORAFA_ADAPTERS" not in os.environ and Path(DEFAULT_ADAPTER_DIR).is_dir():
            args.adapters = [DEFAULT_ADAPTER_DIR]
    for name in ("max_new_tokens", "max_prompt_chars", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1.")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the demo (`hf-lorafa demo ...` / `python spaces_demo/app.py ...`) until interrupted.

    Example:

    ```python
    >>> main(["--base-model", "smollm2", "--adapter", "outputs/smollm2-lorafa", "--port", "7860"])  # doctest: +SKIP
    ```
    """
    args = parse_args(argv)
    try:
        tokenizer, models = load_models(args.base_model, args.adapters, device=args.device)
    except (ValueError, OSError) as err:  # a wrong path or id: say so, without a traceback
        raise SystemExit(f"hf-lorafa demo: error: {err}") from None
    demo = build_demo(
        tokenizer,
        models,
        max_prompt_chars=args.max_prompt_chars,
        max_new_tokens=args.max_new_tokens,
        concurrency_limit=args.concurrency,
    )
    print(f"Serving {', '.join(models)} on http://{args.host}:{args.port}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=False, show_error=False, ssr_mode=False)
