"""Batched sampling with the KV cache (HF `generate`). A faster engine can slot in behind `generate`."""
from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Continuations of `prompts` (without the prompt), decoded up to the first EOS.

    Prompts are left-padded so that every row's next token sits at the last position; a prompt
    longer than `max_prompt_tokens` keeps its last tokens (the latest dialogue turns).
    temperature 0 means greedy decoding.
    """
    was_training, sides = model.training, (tokenizer.padding_side, tokenizer.truncation_side)
    model.eval()
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    device = next(model.parameters()).device
    limit = max_prompt_tokens or model.config.max_position_embeddings - max_new_tokens
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=limit
            ).to(device)
            # top_k 0: sample from the full (temperature, top-p) distribution, not HF's default top-50
            sampling = dict(temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else {}
            tokens = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
                do_sample=temperature > 0,
                **sampling,
            )
            out += tokenizer.batch_decode(tokens[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return out
