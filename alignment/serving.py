"""Saved model folders as the components MLflow's transformers flavor logs, and registered models back
as folders the project's loaders read. The MLflow calls themselves are in alignment/tracking.py.

A policy is logged as a chat model (task `llm/v1/chat`: OpenAI-style `messages` in, a `chat.completion`
out) through its tokenizer's chat template. A tokenizer without one (the embedded default's trained BPE)
gets the HH dialogue format the pipeline renders conversations in (alignment/data/chat.py): `\\n\\nHuman:
... \\n\\nAssistant:`; only the logged copy gets it, and `hf_folder` takes it off again, so a model that
comes back from the registry renders prompts as it was trained to. The reward model is logged as the
pyfunc in alignment/reward_pyfunc.py, which imports nothing from this project.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from alignment.models.loading import ADAPTER_CONFIG, BASE_RECORD, load_tokenizer

HH_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '\\n\\n' + {'user': 'Human', 'assistant': 'Assistant', 'system': 'System'}[message['role']] + ': ' "
    "+ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)
ADDED_TEMPLATE = "alignment.added_chat_template"  # MLmodel metadata: the HH template is the logged copy's
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "The film was"}], "max_tokens": 16}
REWARD_EXAMPLE = {"prompt": ["The film was"], "response": [" wonderful."]}
MODEL_CARD = """---
library_name: transformers
pipeline_tag: text-generation
tags: [alignment-pipeline]
---
# {name}

A causal LM trained by the alignment pipeline (DVC stages, MLflow runs); logged with MLflow's
transformers flavor as a chat model. Prompts go through the tokenizer's chat template{template}.
"""


def chat_tokenizer(folder: Path):
    """The folder's tokenizer, with the HH template when it has none; and whether one was added."""
    tokenizer = load_tokenizer(folder)
    # transformers ignores it for a BPE (warning at each load of the logged copy); False means the same
    tokenizer.clean_up_tokenization_spaces = False
    added = not getattr(tokenizer, "chat_template", None)
    if added:
        tokenizer.chat_template = HH_CHAT_TEMPLATE
    return tokenizer, added


def causal_lm(folder: Path):
    """The model in `folder` in the dtype it is stored in (transformers 5 loads `auto` by default)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    # what MLflow's card and hub look-ups see: a path, never a name that looks like a hub id (`outputs/sft`)
    model.name_or_path = str(Path(folder).resolve())
    return model


def adapter_on(folder: Path, base_path: str, base_name: str):
    """The LoRA adapter in `folder` as a peft model on the base at `base_path`, naming its base
    `base_name` (a hub id, or a registered version's URI) in the adapter_config.json it saves."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path)
    base.name_or_path = base_name
    model = PeftModel.from_pretrained(base, str(folder))
    model.peft_config[model.active_adapter].base_model_name_or_path = base_name
    return model


def model_card(name: str, added_template: bool):
    from huggingface_hub import ModelCard

    template = " (none came with it: the HH format `Human:` / `Assistant:` turns)" if added_template else ""
    return ModelCard(MODEL_CARD.format(name=name, template=template))


class OutsideDownload(ValueError):
    """A registered version names a path outside its own download."""


def inside(base: Path, relative: str) -> Path:
    """`base / relative`, refused when `relative` is absolute, climbs with `..`, or (through a link) lands
    outside `base`: what an MLmodel file records is data from the registry, not a licence to name any
    folder of the host's (the download is moved from, then deleted)."""
    parts = Path(relative).parts
    if not relative or Path(relative).is_absolute() or ".." in parts:
        raise OutsideDownload(f"artifact path {relative!r}: absolute or `..` paths are refused")
    path = (base / relative).resolve()
    if not path.is_relative_to(base.resolve()):
        raise OutsideDownload(f"artifact path {relative!r} leads outside {base}")
    return path


def hf_folder(local: Path, flavors: dict, metadata: dict | None, base: Path | None = None) -> Path:
    """The saved-model folder inside a downloaded MLflow model `local` (moved to `local/hf`, so that the
    download's temporary folder is `hf`'s grandparent): weights, config and the tokenizer in one folder,
    as `load_causal_lm` / `load_reward_model` read it. An adapter's base is `base` (the flavor's local
    base, or a copy of it downloaded by the caller), written into its adapter_config.json."""
    out = local / "hf"
    if "transformers" not in flavors:  # the reward model's pyfunc: the saved folder is its artifact
        shutil.move(inside(local, str(flavors["python_function"]["artifacts"]["reward_model"]["path"])), out)
        return out
    conf = flavors["transformers"]
    adapter = conf.get("peft_adaptor")
    shutil.move(inside(local, str(adapter or conf.get("model_binary", "model"))), out)
    for file in inside(local, "components/tokenizer").iterdir():
        shutil.copy2(file, out / file.name)
    if (metadata or {}).get(ADDED_TEMPLATE):
        (out / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((out / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if adapter:
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        base_name = str(base) if base is not None else conf["source_model_name"]  # a hub id
        (out / ADAPTER_CONFIG).write_text(json.dumps(config | {"base_model_name_or_path": base_name}))
        (out / BASE_RECORD).unlink(missing_ok=True)
    return out
