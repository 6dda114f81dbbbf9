"""Token ids for {prompt, response} examples and their right-padded batches, shared by every stage
that trains or scores text (SFT, reward model, DPO): labels hold IGNORE_INDEX on the prompt."""

from __future__ import annotations

import torch

from alignment.data.chat import end_of_turn_id
from alignment.losses.logprobs import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A (rendered) prompt's ids, as every stage and the sampler tokenize it: with the tokenizer's own
    special tokens, less a second BOS where a chat template already opened the text with one."""
    ids = tokenizer(prompt).input_ids
    bos = tokenizer.bos_token_id
    return ids[1:] if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos else ids


def encode(tokenizer, prompt: str, response: str, max_length: int, finished: bool) -> dict[str, list[int]]:
    """Prompt and response tokenized apart (so the mask is exact, and as a sampler makes them: prompt ids,
    then the response's), the end of turn (`chat.end_of_turn_id`: the EOS without a chat template)
    closing the response only when it is `finished`: a data set's answer, or a sample the model ended
    itself. A sample cut at max_new_tokens gets none, or a reward model could
    not tell it from a finished one and DPO would learn an EOS the policy never chose.

    Over-long examples keep at most half the budget for the prompt, cut from its left (the latest
    dialogue turns matter most), and then cut the response on the right (losing its EOS: cut, it is
    no longer finished).
    """
    prompt = prompt_ids(tokenizer, prompt)
    response = tokenizer(response, add_special_tokens=False).input_ids + (
        [end_of_turn_id(tokenizer)] if finished else []
    )
    return fit(prompt, response, max_length)


def fit(prompt: list[int], response: list[int], max_length: int) -> dict[str, list[int]]:
    """Prompt and response ids as one example of at most `max_length` tokens, labels on the response:
    an over-long one keeps at most half the budget for the prompt, cut from its left, and then cuts the
    response on the right. The rule of every stage that trains on text (`encode`) and on samples."""
    if len(prompt) + len(response) > max_length:
        prompt = prompt[-max(max_length // 2, max_length - len(response)) :]
    input_ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def as_example(prompt_ids: list[int], response_ids: list[int]) -> dict[str, list[int]]:
    """A sampled (prompt, response) as a training or scoring example, token for token as the sampler made
    it: EOS only where the model emitted one."""
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def collate(pad_token_id: int):
    def pad(examples: list[dict[str, list[int]]]) -> Batch:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_token_id)
        labels = torch.full((len(examples), width), IGNORE_INDEX)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = (
                torch.tensor(e["input_ids"]),
                torch.tensor(e["labels"]),
                1,
            )
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return pad
