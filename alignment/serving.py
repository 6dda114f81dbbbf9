"""The MLflow pyfunc wrapper of a saved causal LM: `predict` continues a list of prompts."""
from __future__ import annotations

import mlflow.pyfunc


class CausalLMPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the HF folder logged as the `hf_model` artifact; greedy continuation of each prompt."""

    def load_context(self, context) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["hf_model"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        from alignment.generation import generate

        prompts = list(model_input["prompt"] if hasattr(model_input, "columns") else model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens", 48))
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
