"""The registered reward model as an MLflow pyfunc that scores responses: logged as a model from code
(this file is the model's code, copied into the MLflow model), it imports nothing from this project, so
it loads wherever mlflow, torch and transformers are installed:

    scorer = mlflow.pyfunc.load_model("models:/alignment-rm/1")
    scorer.predict(pd.DataFrame({"prompt": ["The film was"], "response": [" wonderful."]}))  # [0.83]

Input: a DataFrame (or dict of lists) with `prompt` and `response` text (a conversation rendered as the
pipeline renders it: the tokenizer's chat template, or `\\n\\nHuman: ... \\n\\nAssistant:`), and optionally
`finished` (bool): a response cut at a length limit is scored without the EOS that closes a finished
answer. Output: one reward per row. It reads the score as alignment/models/reward_model.py does (the
head's score at the last real token, or the mean over the response's tokens when the model's config says
`reward_pooling: mean`), from the same token ids (alignment/data/batching.py `encode`): a test holds the
two to the same numbers.
"""

from __future__ import annotations

import mlflow
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class RewardModel(PythonModel):
    def load_context(self, context) -> None:
        path = context.artifacts["reward_model"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval().requires_grad_(False)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.pooling = getattr(self.model.config, "reward_pooling", "last")
        config = context.model_config or {}
        self.max_length, self.batch_size = (
            int(config.get("max_length", 256)),
            int(config.get("batch_size", 32)),
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[float]:
        prompts, responses = list(model_input["prompt"]), list(model_input["response"])
        columns = model_input.columns if hasattr(model_input, "columns") else model_input
        finished = list(model_input["finished"]) if "finished" in columns else [True] * len(prompts)
        examples = [self.encode(p, r, bool(f)) for p, r, f in zip(prompts, responses, finished)]
        rewards: list[float] = []
        for start in range(0, len(examples), self.batch_size):
            rewards += self.score(examples[start : start + self.batch_size])
        return rewards

    def encode(self, prompt: str, response: str, finished: bool) -> tuple[list[int], int]:
        """Token ids and the prompt's length, cut to max_length: the prompt keeps at most half of it, from
        its left, then the response is cut on the right."""
        ids = self.tokenizer(prompt).input_ids
        bos = self.tokenizer.bos_token_id
        if (
            bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos
        ):  # a template's BOS and the tokenizer's
            ids = ids[1:]
        answer = self.tokenizer(response, add_special_tokens=False).input_ids
        answer += [self.tokenizer.eos_token_id] if finished else []
        if len(ids) + len(answer) > self.max_length:
            ids = ids[-max(self.max_length // 2, self.max_length - len(answer)) :]
        return (ids + answer)[: self.max_length], len(ids)

    @torch.no_grad()
    def score(self, examples: list[tuple[list[int], int]]) -> list[float]:
        width = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((len(examples), width), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        response = torch.zeros((len(examples), width))
        for row, (ids, prompt_length) in enumerate(examples):
            input_ids[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), 1
            response[row, prompt_length : len(ids)] = 1.0
        device = self.model.device
        hidden = self.model.base_model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
        scores = self.model.score(hidden.last_hidden_state).squeeze(-1).float().cpu()
        if self.pooling == "mean":
            return ((scores * response).sum(1) / response.sum(1)).tolist()
        return scores.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1).tolist()  # right-padded


mlflow.models.set_model(RewardModel())
