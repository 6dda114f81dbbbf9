"""MLflow pyfunc wrappers of saved HF folders, so registered models serve from the registry."""

from __future__ import annotations

import mlflow.pyfunc


class CausalLMPyfunc(mlflow.pyfunc.PythonModel):
    """`predict(prompts)` -> greedy continuations (params: max_new_tokens)."""

    def load_context(self, context) -> None:
        from alignment.models.loading import load_causal_lm, load_tokenizer

        path = context.artifacts["hf_model"]
        self.tokenizer, self.model = load_tokenizer(path), load_causal_lm(path).eval()

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        from alignment.models.generation import generate

        prompts = list(model_input["prompt"] if hasattr(model_input, "columns") else model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens", 48))
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)


class RewardModelPyfunc(mlflow.pyfunc.PythonModel):
    """`predict({"prompt": [...], "response": [...]})` -> one scalar reward per row. Responses are scored as
    complete answers (closed with EOS) unless a `finished` column says which were cut off."""

    def load_context(self, context) -> None:
        from alignment.models.reward_model import RewardScorer

        self.scorer = RewardScorer(context.artifacts["hf_model"])

    def predict(self, context, model_input, params: dict | None = None) -> list[float]:
        prompts, responses = list(model_input["prompt"]), list(model_input["response"])
        has_flags = "finished" in (model_input.columns if hasattr(model_input, "columns") else model_input)
        finished = list(model_input["finished"]) if has_flags else [True] * len(prompts)
        return self.scorer(prompts, responses, finished).tolist()


PYFUNCS = {"causal_lm": CausalLMPyfunc, "reward": RewardModelPyfunc}
