"""Greedy continuations of a few fixed prompts: the quickest way for a reader of a report to see whether a
quantized model still talks."""

from __future__ import annotations

import torch

PROMPTS = ("The capital of France is", "The theory of relativity was developed by",
           "To make a cup of tea, first")


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts=PROMPTS, n_new: int = 24) -> list[dict]:
    """[{"prompt", "continuation"}]: n_new greedy tokens after each prompt (no EOS stop), decoded."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=n_new, min_new_tokens=0, eos_token_id=None,
                              pad_token_id=0)
    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, ids.shape[1]:]
        out.append({"prompt": prompt, "continuation": tokenizer.decode(tokens, skip_special_tokens=True)})
    return out
