"""Models and tokenizers: trained BPE, models built from a config, and a real GGUF checkpoint."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from alignment.config import LoraConfig, ModelConfig
from alignment.models.generation import generate
from alignment.models.loading import (
    build_model,
    flash_attention_usable,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    save_pretrained,
    train_tokenizer,
)
from alignment.models.lora import add_adapter, save_adapter

TEXTS = ["The film was wonderful.", "A dull, lifeless plot.", "\n\nHuman: hi\n\nAssistant: hello"] * 20


def test_trained_bpe_round_trips_any_text_and_has_special_tokens():
    tokenizer = train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    for text in ["never seen: ünïcödé ☃ and <br /> tags", "\n\nHuman: x\n\nAssistant:"]:
        assert tokenizer.decode(tokenizer(text).input_ids) == text  # byte-level: nothing is unknown
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_models_built_from_a_config_save_as_safetensors_and_load_back(arch, tmp_path):
    tokenizer = train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    model = build_model(
        ModelConfig(arch=arch, n_layer=1, n_embd=16, n_head=2, max_position_embeddings=32), tokenizer
    )
    assert model.config.vocab_size == len(tokenizer)
    save_pretrained(model, tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = load_causal_lm(tmp_path)
    ids = torch.tensor([tokenizer("The film").input_ids])
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)
    out = generate(loaded, load_tokenizer(tmp_path), ["The film", "A"], max_new_tokens=4, temperature=1.0)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_load_options_reach_the_model(tmp_path):
    """dtype and attn_implementation: passed to from_pretrained (init: pretrained), applied by cast
    and config (init: config); the defaults leave the model as before, float32 with the default attention."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    small = dict(n_layer=1, n_embd=16, n_head=2, max_position_embeddings=32)
    default = build_model(ModelConfig(**small), tokenizer)
    assert default.dtype == torch.float32
    assert default.config._attn_implementation == GPT2LMHeadModel(GPT2Config()).config._attn_implementation
    fresh = build_model(ModelConfig(**small, dtype="bfloat16", attn_implementation="eager"), tokenizer)
    assert fresh.dtype == torch.bfloat16 and fresh.config._attn_implementation == "eager"
    save_pretrained(default, tokenizer, tmp_path)
    cfg = ModelConfig(
        init="pretrained", name_or_path=str(tmp_path), dtype="float16", attn_implementation="eager"
    )
    loaded = build_model(cfg, tokenizer)
    assert loaded.dtype == torch.float16 and loaded.config._attn_implementation == "eager"
    assert load_causal_lm(tmp_path, dtype="auto").dtype == torch.float32  # as saved


def test_the_attention_implementation_follows_the_saved_model(tmp_path):
    """SFT's attn_implementation is what every later stage loads its folder with (causal LM, reward model,
    an adapter on it); an explicit choice at load wins; flash attention saved on a GPU machine loads with
    sdpa where it cannot run (no flash_attn, or no CUDA), instead of failing the stage."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    small = dict(n_layer=1, n_embd=16, n_head=2, max_position_embeddings=32)
    save_pretrained(
        build_model(ModelConfig(**small, attn_implementation="eager"), tokenizer), tokenizer, tmp_path
    )
    assert json.loads((tmp_path / "config.json").read_text())["attn_implementation"] == "eager"
    loaded = load_causal_lm(tmp_path)
    assert loaded.config._attn_implementation == "eager"
    assert load_sequence_classifier(tmp_path).config._attn_implementation == "eager"
    assert load_causal_lm(tmp_path, attn_implementation="sdpa").config._attn_implementation == "sdpa"
    save_pretrained(loaded, tokenizer, tmp_path / "dpo")  # a later stage's output keeps it
    assert load_causal_lm(tmp_path / "dpo").config._attn_implementation == "eager"
    adapter = add_adapter(load_causal_lm(tmp_path), LoraConfig(r=2, alpha=4))
    save_adapter(adapter, tokenizer, tmp_path / "lora")
    assert load_causal_lm(tmp_path / "lora").config._attn_implementation == "eager"

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attn_implementation": "flash_attention_2"}))
    assert not flash_attention_usable()  # this machine: no flash_attn, no CUDA
    assert load_causal_lm(tmp_path).config._attn_implementation == "sdpa"
    assert load_sequence_classifier(tmp_path).config._attn_implementation == "sdpa"
