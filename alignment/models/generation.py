"""Batched sampling with the KV cache.

The decoding loop is our own rather than HF `generate`: on CPU, `torch.multinomial` (which `generate`
uses) spent more than half of every step drawing one exponential variate per vocabulary entry.
Sampling by inverse CDF (one uniform per row, `searchsorted` on the cumulative probabilities) draws
from the same distribution and halves the time per sample. Any causal LM with a KV cache works:
prompts are left-padded and positions are counted from each row's first real token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.data.batching import prompt_ids
from alignment.data.chat import end_of_turn_id
from alignment.models.scoring import inner_model, progress, takes


def prompt_seed(seed: int, prompt: str, index: int = 0) -> int:
    """The seed of sample `index` of `prompt`: a function of (seed, prompt, index) alone, so a sample does
    not depend on the batch (or the process) that drew it."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{index}\0{prompt}".encode()).digest()[:8], "little")


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, uniforms: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) token ids drawn from softmax(logits / temperature), restricted to the top-p nucleus;
    temperature 0 is greedy. One uniform u in [0, 1) per row: `uniforms` (B,) when given, else from
    the global torch RNG. A token of zero probability (outside the nucleus) is never drawn, at any u."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token while the mass before it is below top_p (the most likely token is always kept)
        sorted_probs = sorted_probs * ((sorted_probs.cumsum(-1) - sorted_probs) < top_p)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) if uniforms is None else uniforms.to(cdf)[:, None]
    # the first token whose cdf reaches the target: cdf[i - 1] < target <= cdf[i], so its own mass is
    # positive, for every target > 0. u can be exactly 0 (then the search returned token 0, EOS, whatever
    # its probability, even outside the nucleus): the target is held above 0. u * total never exceeds the
    # total, which the last token of positive mass reaches first.
    target = (u * cdf[:, -1:]).clamp_min(torch.finfo(cdf.dtype).tiny)
    return torch.searchsorted(cdf, target).squeeze(-1)


def row_uniforms(seeds: Sequence[int], steps: int, device: torch.device) -> torch.Tensor:
    """(len(seeds), steps) float32 uniforms for `sample_next`, row i's from a generator seeded seeds[i]:
    drawn at once and sent to the device in one copy (a copy per token would make the host wait for the
    GPU each time); numpy's k-th draw is the same whether drawn one by one or k at a time."""
    draws = np.stack([np.random.default_rng(seed).random(steps) for seed in seeds])
    return torch.from_numpy(draws).float().to(device)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> list[int]:
    """Every id that ends a sample: the chat template's end of turn (what `batching.encode` closes a
    finished answer with), the tokenizer's EOS, and each id of the model's `generation_config.eos_token_id`
    (a list for Qwen2.5 and Llama-3.x: their samples stop at <|im_end|> or <|eot_id|> as well as at the
    end of text)."""
    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id]
    config = getattr(inner_model(model), "generation_config", None) if model is not None else None
    eos = getattr(config, "eos_token_id", None)
    ids += eos if isinstance(eos, (list, tuple)) else [eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


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
    seeds: Sequence[int] | None = None,
    *,
    check_every: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per prompt, exactly as sampled: the response ends with its stop token
    (`stop_token_ids`: EOS, the chat template's end of turn, the model's other end ids) when the model
    emitted one (it is part of the sample's probability) and is cut at max_new_tokens otherwise.

    Prompts are tokenized as every stage tokenizes them (`batching.prompt_ids`) and left-padded so that
    every row's next token sits at the last position; a prompt longer than `max_prompt_tokens` keeps its
    last tokens (the latest dialogue turns). `batch_size` prompts are sampled at once; the prefill forms
    logits at each row's last position only, never for the prompt's own positions. Ids past the
    tokenizer's vocabulary (Qwen pads its embedding to 151,936 rows for 151,665 tokens) are never drawn:
    they have no text.
    temperature 0 means greedy decoding. With `seeds` (one per prompt) each row draws from its own
    generator, so a prompt's sample does not depend on which prompts share its batch (what lets the
    evaluation cache generations per prompt); without, rows share the global torch RNG.
    `check_every` k: whether every row has ended is asked every k tokens (default: 1 on a CPU, 8 on a
    GPU, where the question makes the host wait for the GPU). A batch's samples are the same for any k:
    a row's tokens after its stop token are discarded, and rows draw independently. With `seeds` so are
    all; without, the shared RNG has moved on by up to k - 1 extra draws when the next batch starts.
    """
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    was_training, sides = model.training, (tokenizer.padding_side, tokenizer.truncation_side)
    model.eval()
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    device = next(model.parameters()).device
    limit = max_prompt_tokens or model.config.max_position_embeddings - max_new_tokens
    stops = stop_token_ids(tokenizer, model)
    stop = torch.tensor(stops, device=device)
    vocabulary = len(tokenizer)
    check_every = check_every or (8 if device.type == "cuda" else 1)
    # transformers 5's Cache keyword (`past_key_values` before it), and whether the LM head can skip the
    # prompt's positions
    cache_key = "cache" if takes(model, "cache") else "past_key_values"
    last_only = {"logits_to_keep": 1} if takes(model, "logits_to_keep") else {}
    out: list[tuple[list[int], list[int]]] = []
    starts = range(0, len(prompts), batch_size)
    try:
        for start in progress(starts, "sample"):
            batch = left_padded(
                [prompt_ids(tokenizer, p)[-limit:] for p in prompts[start : start + batch_size]],
                tokenizer.pad_token_id,
                device,
            )
            mask = batch["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            step = model(
                input_ids=batch["input_ids"],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **last_only,
            )
            position, done, tokens = (
                positions[:, -1:],
                torch.zeros(len(mask), dtype=torch.bool, device=device),
                [],
            )
            uniforms = (
                None
                if seeds is None
                else row_uniforms(seeds[start : start + batch_size], max_new_tokens, device)
            )
            for t in range(max_new_tokens):
                u = None if uniforms is None else uniforms[:, t]
                token = sample_next(step.logits[:, -1, :vocabulary], temperature, top_p, u)
                tokens.append(token)
                done |= torch.isin(token, stop)
                # note: done.all() is a GPU-to-host sync point, hence asked only every check_every tokens
                if (len(tokens) % check_every == 0 and done.all()) or len(tokens) == max_new_tokens:
                    break
                mask, position = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), position + 1
                cache = step.cache if cache_key == "cache" else step.past_key_values
                step = model(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=position,
                    use_cache=True,
                    **{cache_key: cache},
                )
            rows = torch.stack(tokens, dim=1).tolist()
            for ids, row_mask, row in zip(
                batch["input_ids"].tolist(), batch["attention_mask"].tolist(), rows
            ):
                # what follows the first stop token is discarded
                end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
                out.append(([i for i, m in zip(ids, row_mask) if m], row[:end]))
    finally:
        model.train(was_training)
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return out


def left_padded(rows: list[list[int]], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Prompts left-padded to one width, so that every row's next token sits at the last position."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad_token_id] * (width - len(row)) + row for row in rows], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    return {"input_ids": ids, "attention_mask": mask}


def ended(
    tokenizer: PreTrainedTokenizerBase,
    samples: list[tuple[list[int], list[int]]],
    model: PreTrainedModel | None = None,
) -> list[bool]:
    """Per sample of `generate_ids`, whether the model finished it (emitted a stop token) rather than
    being cut at max_new_tokens: what tells a reward model or a trainer to close the response. `model`:
    the one that drew the samples, whose generation config may name further end ids."""
    stops = set(stop_token_ids(tokenizer, model))
    return [bool(response) and response[-1] in stops for _, response in samples]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
    max_prompt_tokens: int | None = None,
    seeds: Sequence[int] | None = None,
) -> list[str]:
    """Continuations of `prompts` (without the prompt) as text, up to the first EOS."""
    samples = generate_ids(
        model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size, max_prompt_tokens, seeds
    )
    return decode_responses(tokenizer, samples)


def decode_responses(
    tokenizer: PreTrainedTokenizerBase, samples: list[tuple[list[int], list[int]]]
) -> list[str]:
    """The responses of `generate_ids` as text, without their EOS (what `generate` returns)."""
    return tokenizer.batch_decode([response for _, response in samples], skip_special_tokens=True)
