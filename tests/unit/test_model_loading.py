"""The detection tools load a local transformers model from safetensors only, never a pickle."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from monitor.features.build.conversations import default_model_dir, load_model
from monitor.features.errors import FeatureError

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _tiny_model_dir(tmp_path: Path) -> tuple[Path, BertModel]:
    """A tiny BERT with MiniLM's tokenizer files (the tokenizer loads; only weights differ)."""
    directory = tmp_path / "model"
    directory.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir() / name, directory / name)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
    )
    config.save_pretrained(directory)
    return directory, BertModel(config)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    directory, model = _tiny_model_dir(tmp_path)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")  # a pickle
    with pytest.raises(FeatureError, match="safetensors"):
        load_model(directory)


def test_safetensors_weights_load(tmp_path: Path) -> None:
    directory, model = _tiny_model_dir(tmp_path)
    model.save_pretrained(directory, safe_serialization=True)
    loaded, tokenizer = load_model(directory)
    assert not loaded.training
    assert tokenizer("hello")["input_ids"]
