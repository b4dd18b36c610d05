"""Shared fixtures. The real SmolLM2-135M is loaded once per session (GGUF, ~20 s) unless SAGE_TEST_MODEL_DIR
points at a saved float32 copy; tiny random LLaMA models with a small trained tokenizer cover the fast paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
WIKI_TEST = SHARED_DATA / "wikitext2" / "wiki.test.raw"
WIKI_VALID = SHARED_DATA / "wikitext2" / "wiki.valid.tokens"

_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Packed weights keep one bit per weight and a few scales. "
    "Salient weights keep four bits with one scale per row; the rest are binarised in magnitude groups. "
) * 4


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TOKENIZER_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    """A 2-block random LLaMA. Hidden size 68 and intermediate size 164 are not multiples of 8, so every packed
    row (K = 68 or 164) has padding bits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    cfg = dict(hidden_size=68, intermediate_size=164, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=512,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "model")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """A float32 HF copy of the default model (fast to reload in each test that needs a fresh one)."""
    env = os.environ.get("SAGE_TEST_MODEL_DIR")
    if env and (Path(env) / "config.json").is_file():
        return Path(env)
    from sage_export.models import load_model

    loaded = load_model(None)
    out = tmp_path_factory.mktemp("smollm2") / "f32"
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out
