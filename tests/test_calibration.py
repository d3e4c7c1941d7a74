"""Calibration formats (Qwen conversation JSON, JSONL, text), batching, and clear errors."""

import json

import pytest
from transformers import AutoTokenizer

from quantizer.calibration import CalibrationConfig, load_texts, make_batches, tokenize_samples
from quantizer.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return AutoTokenizer.from_pretrained(default_model)


def test_qwen_conversation_json_uses_chat_template(tmp_path, tokenizer):
    data = [{"id": "identity_0", "conversations": [
        {"from": "user", "value": "What is GPTQ?"},
        {"from": "assistant", "value": "A post-training quantization method."}]}]
    path = tmp_path / "qwen.json"
    path.write_text(json.dumps(data))
    (text,) = load_texts(path, tokenizer)
    assert "<|im_start|>user\nWhat is GPTQ?<|im_end|>" in text
    assert "<|im_start|>assistant\nA post-training quantization method.<|im_end|>" in text


def test_jsonl_text_and_messages(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "plain words"}) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    texts = load_texts(path, tokenizer)
    assert texts[0] == "plain words" and "<|im_start|>user\nhi<|im_end|>" in texts[1]


def test_plain_text_is_cut_into_windows(tmp_path, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    samples = tokenize_samples(path, tokenizer, CalibrationConfig(num_samples=5, max_len=64))
    assert len(samples) == 5 and all(len(s) == 64 for s in samples)


def test_sampling_is_seeded(tokenizer):
    from quantizer.calibration import default_calibration_file

    cfg = CalibrationConfig(num_samples=8, max_len=32, seed=3)
    a = tokenize_samples(default_calibration_file(), tokenizer, cfg)
    b = tokenize_samples(default_calibration_file(), tokenizer, cfg)
    assert all((x == y).all() for x, y in zip(a, b))


def test_batches_are_right_padded_with_masks(tokenizer):
    import torch

    samples = [torch.arange(5), torch.arange(3), torch.arange(4)]
    (batch,) = make_batches(samples, 4, pad_id=99)
    assert batch.input_ids.shape == (3, 5)
    assert batch.mask.sum(dim=1).tolist() == [5, 4, 3]
    assert batch.input_ids[2, 3:].tolist() == [99, 99]


@pytest.mark.parametrize("name,content,message", [
    ("missing.jsonl", None, "does not exist"),
    ("empty.jsonl", "  \n", "is empty"),
    ("broken.jsonl", '{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
    ("broken.json", "[{", "not valid JSON"),
    ("nofield.jsonl", '{"body": "x"}\n', "no `text`, `messages` or `conversations`"),
])
def test_bad_calibration_files(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        tokenize_samples(path, tokenizer, CalibrationConfig())
