"""Hub push/download and model cards, with the real huggingface_hub client over HTTP to tests/hub_server.py."""

from __future__ import annotations

import copy
import logging
import socket
import time

import huggingface_hub.constants
import pytest
import torch
from conftest import BAD_TOKEN, METHODS, TOKEN, perturb_adapters, tiny_llama, train_steps
from transformers import AutoModelForCausalLM

import hf_lorafa.hub.push
from hf_lorafa import LoRAFAConfig, LoRAFATrainer, inject_adapters, load_adapter, save_adapter
from hf_lorafa.hub.card import write_model_card
from hf_lorafa.hub.push import HubUploadError, push_adapter

INFO = {  # what the trainer adds to hf_lorafa.json
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "dataset": "tatsu-lab/alpaca",
    "trainable_parameters": 12_345,
    "total_parameters": 1_234_567,
    "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "training": {"learning_rate": 2e-4, "max_steps": 10, "per_device_train_batch_size": 8, "seed": 0},
    "results": {"eval_loss_before": 2.5, "eval_loss": 1.9876, "train_loss": 2.1},
    "memory": {
        "peak_bytes": 3 * 2**30,
        "peak_kind": "cuda_allocated",
        "activation_bytes": 5 * 2**20,
        "device": "cuda",
    },
    "hub_token": TOKEN,  # a careless caller's field: must never reach the card
}
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def adapter_folder(path, method: str, seed: int = 3, extra: dict | None = None):
    """Save a perturbed adapter of `method` on the tiny Llama; returns (base model, logits with the adapter)."""
    base = tiny_llama()
    model = inject_adapters(copy.deepcopy(base), LoRAFAConfig(method=method, r=4, target_modules=["q_proj", "v_proj"]))
    perturb_adapters(model, seed=seed)
    save_adapter(model, path, extra=extra)
    return base, model(IDS).logits.detach()


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("method", METHODS)
def test_push_then_load_from_hub_id_gives_same_logits(method, hub, tmp_path):
    folder = tmp_path / "adapter"
    base, expected = adapter_folder(folder, method)
    repo_id = f"user/tiny-{method.replace('+', 'p')}"
    url = push_adapter(folder, repo_id, endpoint=hub.url)
    assert url.startswith(f"{hub.url}/{repo_id}/commit/")
    files = set(hub.state.repos[repo_id]["commits"][url.rsplit("/", 1)[1]])
    assert files >= {"adapter_config.json", "adapter_model.safetensors", "hf_lorafa.json", "README.md"}
    model = load_adapter(copy.deepcopy(base), repo_id).eval()
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_revision_pinning_and_branches(hub, tmp_path):
    folder = tmp_path / "adapter"
    base, first = adapter_folder(folder, "lorafa", seed=3)
    first_sha = push_adapter(folder, "user/pinned", endpoint=hub.url).rsplit("/", 1)[1]
    _, second = adapter_folder(folder, "lorafa", seed=4)
    push_adapter(folder, "user/pinned", endpoint=hub.url, commit_message="second")
    assert not torch.allclose(first, second)
    for revision, expected in ((first_sha, first), (None, second), ("main", second)):
        model = load_adapter(copy.deepcopy(base), "user/pinned", revision=revision).eval()
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    _, third = adapter_folder(folder, "lorafa", seed=5)
    push_adapter(folder, "user/pinned", endpoint=hub.url, revision="dev")  # a new branch; main is untouched
    for revision, expected in (("dev", third), ("main", second)):
        model = load_adapter(copy.deepcopy(base), "user/pinned", revision=revision).eval()
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_private_repo_loads_with_the_token_only(hub, tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    base, expected = adapter_folder(folder, "lora")
    push_adapter(folder, "user/secret-adapter", token=TOKEN, private=True, endpoint=hub.url)
    assert hub.state.repos["user/secret-adapter"]["private"]
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="RepositoryNotFoundError.*pass `token` for a private repo"):
        load_adapter(copy.deepcopy(base), "user/secret-adapter")
    model = load_adapter(copy.deepcopy(base), "user/secret-adapter", token=TOKEN).eval()
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


FAILURES = {  # case → (setup, text the message must contain)
    "no token": ("no_token", ["no Hub token", "hf auth login", "HF_TOKEN", "token="]),
    "bad token": ("bad_token", ["checking the token", "HTTP 401", "rejected"]),
    "server error": ("fail:500:", ["HTTP 500", "server error"]),
    "commit rejected": ("fail:500:/commit/", ["uploading the files", "HTTP 500"]),
    "forbidden": ("fail:403:/repos/create", ["creating the repo", "HTTP 403", "write"]),
    "connection refused": ("closed_port", ["could not reach", "ConnectError"]),
    "endpoint hangs": ("hang", ["checking the token", "did not answer in time"]),
    "offline mode": ("offline", ["HF_HUB_OFFLINE"]),
}


@pytest.mark.parametrize("case", FAILURES)
def test_failed_push_is_one_clear_fast_error_and_leaves_folder_intact(case, hub, tmp_path, monkeypatch, caplog):
    setup, needles = FAILURES[case]
    folder = tmp_path / "adapter"
    adapter_folder(folder, "lorafa", extra=INFO)
    write_model_card(folder, extra={"repo_id": "user/broken"})  # what push refreshes first
    before = snapshot(folder)
    token, endpoint = None, hub.url
    if setup == "no_token":
        monkeypatch.delenv("HF_TOKEN")
    elif setup == "bad_token":
        token = BAD_TOKEN
    elif setup == "closed_port":
        endpoint = closed_port_url()
    elif setup == "hang":
        monkeypatch.setattr(hf_lorafa.hub.push, "PROBE_TIMEOUT_S", 1.0)
        hub.state.hang_s = 3.0
    elif setup == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        _, status, where = setup.split(":")
        hub.state.fail = (int(status), where)
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    with pytest.raises(HubUploadError) as info:
        push_adapter(folder, "user/broken", token=token, endpoint=endpoint)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert elapsed < 10, f"{case}: took {elapsed:.1f} s"
    assert all(needle in message for needle in needles), message
    assert "local adapter folder is unchanged" in message or setup == "no_token"
    assert snapshot(folder) == before
    for secret in (TOKEN, BAD_TOKEN, "SECRET"):
        assert secret not in message and secret not in caplog.text
    if setup in ("no_token", "offline"):
        assert hub.state.requests == []  # refused before any network call


@pytest.mark.parametrize(
    "task_type, pipeline_tag", [("CAUSAL_LM", "text-generation"), ("SEQ_CLS", "text-classification")]
)
def test_card_metadata_figures_and_no_token(task_type, pipeline_tag, hub, tmp_path, caplog):
    import json

    from huggingface_hub import ModelCard

    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "adapter"
    adapter_folder(folder, "lorafa", extra=INFO)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "task_type": task_type}))
    (folder / "memory.json").write_text(json.dumps({**INFO["memory"], "peak_bytes": 3 * 2**30 + 2**29}))
    (folder / "memory.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    push_adapter(folder, "user/carded", endpoint=hub.url)
    text = (folder / "README.md").read_text()
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == INFO["base_model"]
    assert card.data.pipeline_tag == pipeline_tag
    assert card.data.datasets == [INFO["dataset"]]
    assert {"lora-fa", "hf-lorafa", "lora"} <= set(card.data.tags)
    for needle in [
        "arxiv.org/abs/2308.03303",
        "| Peak memory (CUDA allocator) | 3.5 GiB |",  # memory.json wins over hf_lorafa.json's copy
        "| Activations kept for backward | 5.0 MiB |",
        "![memory](memory.png)",
        "12,345 of 1,234,567",
        "bitsandbytes 4-bit (nf4)",
        "| `learning_rate` | 0.0002 |",
        "| `eval_loss` | 1.988 |",
        'load_adapter(model, "user/carded")',
        'PeftModel.from_pretrained(base, "user/carded")',
        "merge_adapters(",
        "- peft ",
        "- transformers ",
    ]:
        assert needle in text, needle
    served = hub.state.repos["user/carded"]["commits"][hub.state.repos["user/carded"]["branches"]["main"]]
    assert served["README.md"].decode() == text
    assert "SECRET" not in text and "SECRET" not in caplog.text


def test_card_of_a_bare_saved_adapter(tmp_path):
    from huggingface_hub import ModelCard

    adapter_folder(tmp_path, "lamda")
    card = ModelCard.load(write_model_card(tmp_path))
    assert card.data.library_name == "peft" and "lamda" in card.data.tags
    assert card.data.pipeline_tag == "text-generation"
    assert "arxiv.org/abs/2406.12832" in card.text and "## Memory" not in card.text
    assert "values in the saved adapter" in card.text


def test_plain_peft_lora_adapter_keeps_training_as_lorafa(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    perturb_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    model = load_adapter(copy.deepcopy(base), tmp_path).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, IDS)
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == ("lora_B" in name), name  # A and the base stay, B trains


def test_cli_push_uses_the_env_endpoint_and_reports_failures(hub, tmp_path, capsys):
    from hf_lorafa.cli import main

    folder = tmp_path / "adapter"
    adapter_folder(folder, "lorafa")
    assert main(["push", str(folder), "user/from-cli", "--private"]) == 0
    assert f"{hub.url}/user/from-cli/commit/" in capsys.readouterr().out
    assert hub.state.repos["user/from-cli"]["private"]
    assert main(["push", str(folder), "user/from-cli", "--token", BAD_TOKEN]) == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and BAD_TOKEN not in err and "SECRET" not in err


def test_trainer_push_to_hub_uploads_adapter_card_and_memory_plot(hub, tmp_path):
    from datasets import Dataset

    from hf_lorafa import LoRAFATrainer, LoRAFATrainingArguments

    ids = torch.randint(0, 256, (16, 12), generator=torch.Generator().manual_seed(0)).tolist()
    args = LoRAFATrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        lora_r=4,
        disable_tqdm=True,
        use_cpu=True,
        activation_savers=False,  # tested in test_savers.py; here only the upload matters
        hub_model_id="user/trained",
        hub_token=TOKEN,
        hub_private_repo=True,
    )
    base = tiny_llama()
    trainer = LoRAFATrainer(
        model=copy.deepcopy(base), args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})
    )
    trainer.train()
    url = trainer.push_to_hub()
    repo = hub.state.repos["user/trained"]
    served = repo["commits"][url.rsplit("/", 1)[1]]
    assert repo["private"]
    assert {"README.md", "adapter_model.safetensors", "hf_lorafa.json", "memory.json", "memory.png"} <= set(served)
    assert not any(name.startswith(("checkpoint", "training_args")) for name in served)
    card = served["README.md"].decode()
    assert "![memory](memory.png)" in card and "| `global_step` | 2 |" in card and TOKEN not in card
    trainer.model.eval()
    model = load_adapter(copy.deepcopy(base), "user/trained").eval()
    torch.testing.assert_close(model(IDS).logits, trainer.model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_card_of_a_local_base_names_no_path(tmp_path):
    from huggingface_hub import ModelCard

    base_dir, data = tmp_path / "private" / "my-base", tmp_path / "private" / "pairs.jsonl"
    base_dir.mkdir(parents=True)
    data.write_text("{}\n")
    folder = tmp_path / "run"
    info = {"base_model": str(base_dir), "dataset": str(data), "training": {"max_steps": 40, "optim": "adamw_torch"}}
    adapter_folder(folder, "lorafa", extra=info)
    text = write_model_card(folder).read_text()
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None and card.data.datasets is None
    assert str(tmp_path) not in text and "private" not in text
    assert "# LoRA-FA adapter\n" in text and "adapter for a local base model" in text
    assert "a local dataset file (`pairs.jsonl`)" in text and "| `max_steps` | 40 |" in text
    assert '"path/to/base-model"' in text and '"path/to/run"' in text and "PATH_OR_REPO_ID" not in text


def test_trainer_card_names_the_hub_base_repo_and_dataset(tmp_path):
    import json

    from huggingface_hub import ModelCard
    from test_trainer import make_args, token_dataset

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    args = make_args(tmp_path, hub_base_model_id="HuggingFaceTB/SmolLM2-135M", hub_model_id="me/tiny-lorafa")
    trainer = LoRAFATrainer(model=model, args=args, train_dataset=token_dataset())
    trainer.run_info["dataset"] = "tatsu-lab/alpaca"
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == args.hub_base_model_id
    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M" and card.data.datasets == ["tatsu-lab/alpaca"]
    assert "# tiny-lorafa" in text and str(base_dir) not in text
    assert 'load_adapter(model, "me/tiny-lorafa")' in text and 'from_pretrained("HuggingFaceTB/SmolLM2-135M")' in text
    assert "| `max_steps` | 4 |" in text and "num_train_epochs" not in text
    assert f"| `optim` | {args.optim.value} |" in text and "OptimizerNames" not in text


def test_a_hub_that_never_answers_the_commit_ends_in_one_bounded_error(hub, tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    adapter_folder(folder, "lorafa")
    monkeypatch.setattr(hf_lorafa.hub.push, "REQUEST_TIMEOUT_S", 1.0, raising=False)
    monkeypatch.setattr(hf_lorafa.hub.push, "BACKOFF_S", 0.1, raising=False)
    hub.state.stall = "/commit/"  # the token check and repo creation answer; the commit is accepted, never answered
    start = time.monotonic()
    with pytest.raises(HubUploadError) as info:
        push_adapter(folder, "user/stalled", endpoint=hub.url)
    assert time.monotonic() - start < 15
    assert "uploading the files" in str(info.value) and "did not answer in time" in str(info.value)
    assert sum("/commit/" in r for r in hub.state.requests) == 3  # retried (ATTEMPTS), then gave up


SECRET_ID = "hf_" + "Ab3" * 12  # token-shaped: hf_ and 36 letters/digits


@pytest.mark.parametrize("repo_id", [SECRET_ID, f"user/{SECRET_ID}", f"{SECRET_ID}/adapter", f"user/x-{SECRET_ID}"])
def test_token_shaped_repo_id_is_refused_before_any_request_without_echo(repo_id, hub, tmp_path, capsys):
    from hf_lorafa.cli import main

    folder = tmp_path / "adapter"
    adapter_folder(folder, "lorafa")
    with pytest.raises(ValueError, match="contains a Hub token") as info:
        push_adapter(folder, repo_id, endpoint=hub.url)
    assert SECRET_ID not in str(info.value)
    assert main(["push", str(folder), repo_id]) == 1
    captured = capsys.readouterr()
    assert "contains a Hub token" in captured.err and SECRET_ID not in captured.err + captured.out
    assert hub.state.requests == [] and hub.state.repos == {}


def test_push_uploads_the_card_that_is_there_and_never_rewrites_it(hub, tmp_path):
    folder = tmp_path / "adapter"
    adapter_folder(folder, "lorafa")
    url = push_adapter(folder, "user/first", endpoint=hub.url)  # no card yet: one is generated
    generated = (folder / "README.md").read_text()
    assert hub.state.repos["user/first"]["commits"][url.rsplit("/", 1)[1]]["README.md"].decode() == generated
    edited = generated.replace("# ", "# My edited title — ", 1)
    (folder / "README.md").write_text(edited)
    url = push_adapter(folder, "user/second", endpoint=hub.url)
    assert (folder / "README.md").read_text() == edited
    assert hub.state.repos["user/second"]["commits"][url.rsplit("/", 1)[1]]["README.md"].decode() == edited


@pytest.mark.parametrize("name", ["README.md", "memory.json", "hf_lorafa.json"])
def test_push_refuses_a_link_to_a_file_outside_the_folder(name, hub, tmp_path):
    folder = tmp_path / "adapter"
    adapter_folder(folder, "lorafa")
    outside = tmp_path / "private-notes.txt"
    outside.write_text("PRIVATE NOTES")
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(outside)
    with pytest.raises(ValueError, match="link to a file outside") as info:
        push_adapter(folder, "user/linked", endpoint=hub.url)
    assert name in str(info.value)
    assert hub.state.requests == [] and outside.read_text() == "PRIVATE NOTES"
