"""Batched sampling with the KV cache (HF `generate`). A faster engine can slot in behind `generate`."""
from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
    max_prompt_tokens: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per prompt, exactly as sampled: the response ends with EOS when the
    model emitted one (it is part of the sample's probability) and is cut at max_new_tokens otherwise.

    Prompts are left-padded so that every row's next token sits at the last position; a prompt
    longer than `max_prompt_tokens` keeps its last tokens (the latest dialogue turns).
    temperature 0 means greedy decoding.
    """
    was_training, sides = model.training, (tokenizer.padding_side, tokenizer.truncation_side)
    model.eval()
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    device = next(model.parameters()).device
    limit = max_prompt_tokens or model.config.max_position_embeddings - max_new_tokens
    out: list[tuple[list[int], list[int]]] = []
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
            width = batch["input_ids"].shape[1]
            for ids, mask, row in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), tokens[:, width:].tolist()):
                # after the first EOS come pad tokens (== EOS for many tokenizers): cut there
                end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                out.append(([i for i, m in zip(ids, mask) if m], row[:end]))
    finally:
        model.train(was_training)
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return out


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
    """Continuations of `prompts` (without the prompt) as text, up to the first EOS."""
    samples = generate_ids(model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size, max_prompt_tokens)
    return tokenizer.batch_decode([response for _, response in samples], skip_special_tokens=True)
