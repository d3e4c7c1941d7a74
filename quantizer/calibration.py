"""Calibration data: Qwen fine-tuning conversation JSON, JSONL or plain text → padded token batches.

- `.json`: a list of `{"conversations": [{"from": "user", "value": ...}, ...]}` (the `--data_path`
  format of Qwen's run_gptq.py) or of `{"messages": [{"role": ..., "content": ...}]}`, rendered with
  the tokenizer's chat template.
- `.jsonl`: one object per line with `text`, `messages` or `conversations`.
- anything else: plain text, tokenized whole and cut into `max_len`-token windows.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from quantizer.activations import TokenBatch
from quantizer.config import CalibrationConfig  # noqa: F401 (its home before quantizer.config)
from quantizer.errors import ConfigError

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def default_calibration_file() -> Path:
    return Path(str(resources.files("quantizer") / "data" / "calibration_wiki.jsonl"))


def default_eval_file() -> Path:
    return Path(str(resources.files("quantizer") / "data" / "eval_wiki.txt"))


def _record_text(record: Any, tokenizer, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected an object with `text`, `messages` or `conversations`")
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("conversations"), list):
        messages = [{"role": _ROLES.get(str(t.get("from", "")).lower(), "user"), "content": str(t.get("value", ""))}
                    for t in record["conversations"]]
    elif isinstance(record.get("messages"), list):
        messages = [{"role": str(m.get("role", "user")), "content": str(m.get("content", ""))}
                    for m in record["messages"]]
    else:
        raise ConfigError(f"{where}: no `text`, `messages` or `conversations` field")
    if not tokenizer.chat_template:
        return "\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False)


def load_texts(path: Path, tokenizer) -> list[str]:
    """Documents from a calibration file (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration file {path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if not raw.strip():
        raise ConfigError(f"calibration file {path} is empty")
    if path.suffix == ".json":
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"calibration file {path} is not valid JSON: {exc}") from exc
        if not isinstance(records, list):
            raise ConfigError(f"{path}: expected a JSON list of conversations")
        return [_record_text(r, tokenizer, f"{path} item {i}") for i, r in enumerate(records)]
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} line {n} is not valid JSON: {exc}") from exc
            texts.append(_record_text(record, tokenizer, f"{path} line {n}"))
        return texts
    return [raw]


def tokenize_samples(path: Path, tokenizer, cfg: CalibrationConfig) -> list[torch.Tensor]:
    """Up to `num_samples` token sequences [≤ max_len] drawn with `seed`."""
    texts = [t for t in load_texts(path, tokenizer) if t.strip()]
    rng = random.Random(cfg.seed)
    if len(texts) == 1:  # plain text: fixed windows over the whole token stream
        ids = tokenizer(texts[0], return_tensors="pt").input_ids[0]
        samples = [ids[i : i + cfg.max_len] for i in range(0, len(ids) - 1, cfg.max_len)]
    else:
        rng.shuffle(texts)
        samples = [tokenizer(t, return_tensors="pt").input_ids[0][: cfg.max_len] for t in texts[: cfg.num_samples * 2]]
    samples = [s for s in samples if len(s) >= 2]
    if not samples:
        raise ConfigError(f"calibration file {path} yields no sequence of at least 2 tokens")
    if len(texts) == 1:
        rng.shuffle(samples)
    return samples[: cfg.num_samples]


def make_batches(samples: list[torch.Tensor], batch_size: int, pad_id: int) -> list[TokenBatch]:
    """Right-padded batches of similar-length sequences (sorted longest first to waste little padding)."""
    ordered = sorted(samples, key=len, reverse=True)
    batches = []
    for i in range(0, len(ordered), batch_size):
        group = ordered[i : i + batch_size]
        width = len(group[0])
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.bool)
        for row, seq in enumerate(group):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
        batches.append(TokenBatch(ids, mask))
    return batches
