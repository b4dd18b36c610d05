import math

import pytest
import torch

from sage_export.eval.perplexity import perplexity, read_eval_text, tokenize_text, windows
from sage_export.models import load_model


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(10)
    w = windows(ids, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(ids, 3, limit=2).shape == (2, 3)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(ids, 11)


def test_uniform_model_has_perplexity_equal_to_vocab_size(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    with torch.no_grad():
        loaded.model.lm_head.weight.zero_()  # every logit 0 → uniform next-token distribution
    ids = torch.randint(0, loaded.model.config.vocab_size, (100,), generator=torch.Generator().manual_seed(0))
    res = perplexity(loaded.model, ids, ctx=32, progress=False)
    assert res.n_windows == 3 and res.n_tokens == 3 * 31
    assert res.ppl == pytest.approx(loaded.model.config.vocab_size, rel=1e-5)


def test_matches_mean_of_per_window_hf_losses(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    ids = torch.randint(0, loaded.model.config.vocab_size, (130,), generator=torch.Generator().manual_seed(1))
    res = perplexity(loaded.model, ids, ctx=64, progress=False)
    with torch.no_grad():
        losses = [loaded.model(w[None], labels=w[None]).loss.item() for w in windows(ids, 64)]
    assert res.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_eval_text_is_joined_with_blank_lines(tmp_path):
    p = tmp_path / "t.raw"
    p.write_text("a\nb\n")
    assert read_eval_text(p) == "a\n\nb"


def test_tokenize_adds_no_special_tokens(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    assert tokenize_text(loaded.tokenizer, "fox").tolist() == loaded.tokenizer("fox", add_special_tokens=False).input_ids
