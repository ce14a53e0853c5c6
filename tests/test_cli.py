"""`hf-lorafa merge` end to end: a 4-bit-trained adapter folds into the dequantized base, saved as a plain model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import perturb_adapters, tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_lorafa import LoRAFAConfig, inject_adapters, load_base_model, save_adapter
from hf_lorafa.data.offline import smollm2_path

pytest.importorskip("bitsandbytes")


def test_merge_command_dequantizes_a_4bit_base(tmp_path):
    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    tiny_llama(hidden=128).save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(base_dir)
    quantized = load_base_model(str(base_dir), load_in_4bit=True)
    model = inject_adapters(quantized, LoRAFAConfig(method="lorafa", r=4))
    perturb_adapters(model)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits.detach()
    save_adapter(model, adapter_dir, extra={"quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}})
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    result = subprocess.run(
        [sys.executable, "-m", "hf_lorafa.cli", "merge", str(adapter_dir), str(merged_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "merged model saved to" in result.stdout
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True)
    assert not getattr(merged.config, "quantization_config", None)
    assert not any("lora" in n for n in merged.state_dict())
    # The merged dense model reproduces the adapted 4-bit model (dequantized weights, fp32 compute on CPU).
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
    # A full-precision merge of the same adapter would not: the adapter was trained on the 4-bit weights.
    plain = inject_adapters(copy.deepcopy(tiny_llama(hidden=128)), LoRAFAConfig(method="lorafa", r=4))
    assert not torch.allclose(plain(ids).logits, expected, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("empty.yaml", "", "holds nothing; it must be a mapping of flag to value"),
        ("list.yaml", "- lora_r: 8\n", "holds a list; it must be a mapping of flag to value"),
        ("empty.json", "{}", "holds nothing; it must be a mapping of flag to value"),
        ("broken.json", '{"lora_r": 8', "could not be read"),
        ("typed.yaml", "lora_r: 8.5\n", "`lora_r` must be an int; got 8.5."),
        ("typed.json", '{"log_memory": "False"}', "`log_memory` must be true or false"),
    ],
)
def test_an_arguments_file_that_is_not_a_mapping_of_valid_flags_is_one_error(name, text, needle, tmp_path, capsys):
    from hf_lorafa.cli import main

    path = tmp_path / name
    path.write_text(text)
    assert main(["train", str(path)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("hf-lorafa train: error:") and needle in last, last


def test_an_arguments_file_takes_lists_as_peft_does(tmp_path):
    from hf_lorafa.cli.main_job import parse

    path = tmp_path / "args.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\nlora_target_modules: [q_proj, v_proj]\nlora_r: 8\n")
    _, args = parse([str(path)])
    config = args.to_lorafa_config()
    assert config.target_modules == ["q_proj", "v_proj"] and config.r == 8
