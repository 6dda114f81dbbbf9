"""CPU twins of real model families' tokenizers: a byte-level BPE trained on the data, padded with tokens
that never occur to the family's vocabulary, then the family's special tokens at their ids, its EOS, pad,
BOS and chat template. A model built from a config over such a tokenizer (`sft.model.vocab_size` for an
embedding padded past it, `sft.model.eos_tokens` for its generation config) runs every code path a
released checkpoint of the family would: a 151k vocabulary, ids past the tokenizer, several end tokens,
an end of turn that is not the end of text, the family's chat template in prompts, masks and judges.

Special tokens and chat templates as the released tokenizers have them (Qwen2.5-Instruct's
tokenizer_config.json; Llama-3.1-Instruct's, its template without the tool-calling branches).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast

QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Family:
    special_tokens: tuple[str, ...]  # in id order, from `first_special` on
    first_special: int  # the id of the first special token: the BPE and its padding fill 0 .. first - 1
    eos: str
    pad: str | None
    bos: str | None
    chat_template: str
    end_tokens: tuple[str, ...]  # the released generation_config.json's eos_token_id
    embedding: int  # the released model's embedding rows (config.json vocab_size)

    @property
    def size(self) -> int:
        return self.first_special + len(self.special_tokens)


_QWEN2_SPECIAL = (
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|> "
    "<|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|> "
    "<tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> <|repo_name|> "
    "<|file_sep|>"
).split()
_LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]

FAMILIES = {
    # Qwen2.5-*-Instruct: 151,665 tokens, an embedding of 151,936 rows
    "qwen2": Family(
        tuple(_QWEN2_SPECIAL),
        151_643,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        bos=None,
        chat_template=QWEN2_TEMPLATE,
        end_tokens=("<|im_end|>", "<|endoftext|>"),
        embedding=151_936,
    ),
    # Llama-3.1-*-Instruct: 128,256 tokens and embedding rows
    "llama3": Family(
        tuple(_LLAMA3_SPECIAL),
        128_000,
        eos="<|eot_id|>",
        pad=None,
        bos="<|begin_of_text|>",
        chat_template=LLAMA3_TEMPLATE,
        end_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        embedding=128_256,
    ),
}


def twin_tokenizer(texts: Iterable[str], family: str, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """The CPU twin of `family`'s tokenizer (see the module docstring), its BPE merges learnt from `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = FAMILIES[family]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.first_special,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    data = json.loads(bpe.to_str())
    vocab = data["model"]["vocab"]
    # tokens no merge ever produces, up to the family's first special id: the ids a released tokenizer
    # gives its learnt merges (a trained model never emits them either)
    filler = (f"<|unused_{i}|>" for i in range(spec.first_special))
    while len(vocab) < spec.first_special:
        vocab[next(filler)] = len(vocab)
    tokenizer = Tokenizer.from_str(json.dumps(data))
    tokenizer.add_special_tokens(list(spec.special_tokens))
    if spec.bos is not None:  # Llama-3 opens every encoding with its BOS
        bos_id = tokenizer.token_to_id(spec.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A $B", special_tokens=[(spec.bos, bos_id)]
        )
    if tokenizer.get_vocab_size() != spec.size:  # a special token the BPE had learnt as text
        raise ValueError(f"{family} twin: {tokenizer.get_vocab_size()} tokens, not the family's {spec.size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=spec.eos,
        pad_token=spec.pad,
        bos_token=spec.bos,
        chat_template=spec.chat_template,
    )
