"""Conversations: prompts as lists of `{role, content}` messages (the format of TRL's and the hub's
conversational datasets), and their rendering for a tokenizer.

A prepared row's `prompt` is either raw text (IMDb review prefixes) or a conversation ending with a user
turn; its responses (`response`, `chosen`, `rejected`) are always the assistant's text. A stage renders
a conversation once, when it loads the rows for its tokenizer:

- with a chat template: `apply_chat_template(messages, add_generation_prompt=True)`, and the response is
  the assistant turn's content (leading whitespace dropped); a finished answer is closed with the
  template's end-of-turn token (`end_of_turn_id`: <|im_end|> for SmolLM2 and Qwen2, <|eot_id|> for
  Llama-3), which the sampler stops on, whatever the tokenizer calls its EOS;
- without one (the embedded default's trained BPE): the Anthropic HH text format, `\\n\\nHuman: …
  \\n\\nAssistant:`, which is the HH transcript itself; the response keeps its leading space.

Raw-text prompts are never touched.
"""

from __future__ import annotations

import functools
import re

Message = dict[str, str]
Prompt = str | list[Message]
ROLES = ("system", "user", "assistant")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
RESPONSE_FIELDS = ("response", "chosen", "rejected")


def hh_messages(transcript: str) -> list[Message] | None:
    """`\\n\\nHuman: … \\n\\nAssistant: …` -> messages, contents stripped; None when text precedes the
    first turn or a turn is not a Human or Assistant one."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3:
        return None
    return [{"role": HH_ROLES[name], "content": text.strip()} for name, text in zip(parts[1::2], parts[2::2])]


def check_messages(messages, where: str) -> list[Message]:
    """`messages` as a list of {role, content} dicts, or ValueError naming `where` and what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} has no `content` string")
        if message.get("role") not in ROLES:
            raise ValueError(f"{where}: message {i} has role {message.get('role')!r}, not one of {ROLES}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def is_conversation(prompt: Prompt) -> bool:
    return isinstance(prompt, list)


def has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def hh_text(messages: list[Message]) -> str:
    """A conversation in the HH format, ending with the generation prompt `\\n\\nAssistant:`."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    turns = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)
    return turns + "\n\nAssistant:"


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text a model continues: raw text as is; a conversation through the tokenizer's chat template
    (with the generation prompt), or in the HH format when it has none (or `tokenizer` is None)."""
    if not is_conversation(prompt):
        return prompt
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return hh_text(prompt)


def render_response(tokenizer, prompt: Prompt, response: str) -> str:
    """The assistant's reply as trained and scored after `render_prompt(tokenizer, prompt)`."""
    return response.lstrip() if is_conversation(prompt) and has_chat_template(tokenizer) else response


def render_row(tokenizer, row: dict) -> dict:
    """A prepared row with its prompt and responses rendered for `tokenizer` (other fields kept)."""
    prompt = row["prompt"]
    out = dict(row, prompt=render_prompt(tokenizer, prompt))
    for key in RESPONSE_FIELDS:
        if key in row:
            out[key] = render_response(tokenizer, prompt, row[key])
    return out


def end_of_turn_id(tokenizer) -> int | None:
    """The token that closes a finished answer: the one the chat template writes right after an
    assistant turn's content (Qwen2's <|im_end|>, Llama-3's <|eot_id|>, which a base model's tokenizer
    does not call its EOS), or the EOS without a template, or when the template ends turns with text
    rather than a token of its own."""
    if not has_chat_template(tokenizer):
        return tokenizer.eos_token_id
    return _template_end_of_turn(tokenizer)


@functools.lru_cache(maxsize=16)  # every encoded example asks; a tokenizer is hashed by identity
def _template_end_of_turn(tokenizer) -> int | None:
    marker = "\u2063answer\u2063"  # text no template adds or strips (invisible separators)
    turns = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # templates that refuse such a chat (a required system turn, tools): the EOS
        return tokenizer.eos_token_id
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False).input_ids if after else []
    special = set(tokenizer.all_special_ids) | {
        i for i, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return ids[0] if ids and ids[0] in special else tokenizer.eos_token_id
