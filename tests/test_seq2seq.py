"""Encoder-decoder models (T5, BART) end to end: `hf-lorafa train` on question/answer rows picks the seq2seq task
(prompt → encoder, answer → labels, `DataCollatorForSeq2Seq`), saves a SEQ_2_SEQ_LM adapter that PEFT loads with our
logits and a card that loads it as one, and `hf-lorafa merge` folds it into the seq2seq model it came from."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset, DatasetDict
from fixtures.families import tiny_model
from fixtures.tiny_folder import build_tokenizer, write_qa_jsonl
from transformers import AutoModelForSeq2SeqLM

from hf_lorafa import load_adapter
from hf_lorafa.cli import main
from hf_lorafa.data.preprocessing import tokenize_for_seq2seq


def seq2seq_folder(family: str, folder):
    """The family's tiny model with the fixture's word-level tokenizer, saved as a user's local model folder."""
    tokenizer = build_tokenizer()
    model = tiny_model(family)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    for config in (model.config, model.generation_config):
        config.update({**ids, "decoder_start_token_id": tokenizer.pad_token_id})
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_seq2seq_rows_encode_the_prompt_and_label_the_answer():
    tokenizer = build_tokenizer()
    rows = [{"question": "what is the cat", "answer": "a big cat"}, {"question": "who", "answer": "  "}]
    chats = [{"messages": [{"role": "user", "content": "hi you"}, {"role": "assistant", "content": "yes"}]}]
    pairs = tokenize_for_seq2seq(DatasetDict({"train": Dataset.from_list(rows)}), tokenizer)["train"]
    assert pairs["input_ids"] == [tokenizer("what is the cat")["input_ids"]]  # the blank answer's row is skipped
    assert pairs["labels"] == [tokenizer("a big cat")["input_ids"]]
    turns = tokenize_for_seq2seq(DatasetDict({"train": Dataset.from_list(chats)}), tokenizer)["train"]
    assert turns["labels"] == [tokenizer("yes")["input_ids"]]
    with pytest.raises(ValueError, match="needs prompt/answer rows: question/answer, prompt/completion or messages"):
        tokenize_for_seq2seq(DatasetDict({"train": Dataset.from_list([{"text": "a b"}])}), tokenizer)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_train_then_merge_an_encoder_decoder(family, tmp_path, capsys):
    from peft import PeftModel

    base = seq2seq_folder(family, tmp_path / "base")
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    argv = [
        "train", "--model_name_or_path", str(base), "--dataset", str(write_qa_jsonl(tmp_path / "qa.jsonl")),
        "--output_dir", str(adapter), "--lora_r", "4", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--learning_rate", "5e-2", "--max_eval_samples", "4", "--sample_prompt", "what is the sun",
        "--save_steps", "10", "--use_cpu", "--disable_tqdm", "true",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out loss:" in out and "sample  Q: what is the sun" in out
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    card = (adapter / "README.md").read_text()
    assert "pipeline_tag: text2text-generation" in card and "AutoModelForSeq2SeqLM" in card

    ids = torch.tensor([[5, 9, 11, 23, 2]])
    inputs = {"input_ids": ids, "decoder_input_ids": torch.tensor([[1, 38, 39, 40]])}
    ours = load_adapter(AutoModelForSeq2SeqLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        expected = ours(**inputs).logits
        peft_model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base), str(adapter)).eval()
        torch.testing.assert_close(peft_model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(AutoModelForSeq2SeqLM.from_pretrained(base)(**inputs).logits, expected)  # trained

        assert main(["merge", str(adapter), str(merged)]) == 0
        folded = AutoModelForSeq2SeqLM.from_pretrained(merged).eval()
        assert not any("lora" in n for n in folded.state_dict())
        torch.testing.assert_close(folded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
