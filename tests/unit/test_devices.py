"""Placement: every model a stage loads, and every batch it feeds one, goes to the device the placement
helper gives (`distributed.device()`, or the model's own device), never to a device named in the code.

The helper is pointed at the meta device: tensors there have shapes but no data, so a model on meta
computes nothing, and a model called with a tensor from elsewhere is caught by a hook. A result copied
back to the host by design (`.cpu()`) comes back as zeros, so a call runs to its end, or to a check that
reads a value (`.item()`, which meta cannot answer). The sampler's own choice by device, how often it
asks whether every row has ended, is tested last.
"""

import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignment.config import LoraConfig, ModelConfig
from alignment.models.generation import generate_ids, prompt_seed
from alignment.models.loading import build_model, save_pretrained, train_tokenizer
from alignment.paths import Paths
from alignment.training import distributed

META = torch.device("meta")
TEXTS = ["The film was a joy from start to finish.", "I hated every minute of it.", "Blue, like the sky."]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 4, vocab_size=270, min_frequency=1)


def tiny(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_embd=16, n_head=2, max_position_embeddings=64, attn_implementation="eager")
    return build_model(cfg, tokenizer)


@pytest.fixture(scope="module")
def paths(tokenizer, tmp_path_factory) -> Paths:
    """A project whose SFT policy is a tiny model saved as the stage saves it."""
    paths = Paths(tmp_path_factory.mktemp("project"))
    save_pretrained(tiny(tokenizer), tokenizer, paths.sft)
    return paths


@pytest.fixture
def on_meta(monkeypatch):
    monkeypatch.setattr(distributed, "device", lambda: META)


def called_on(*models) -> list[torch.device]:
    """The devices of every tensor the models are called with, from here on. Eager attention: sdpa's
    mask asks a meta tensor for a value (loaded models come with transformers' default, sdpa)."""
    seen: list[torch.device] = []

    def record(module, args, kwargs):
        seen.extend(t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))

    for model in models:
        model.set_attn_implementation("eager")
        model.register_forward_pre_hook(record, with_kwargs=True)
    return seen


class HostSeesZeros(TorchDispatchMode):
    """Meta tensors hold no data: a copy of one to another device is zeros of its shape."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func is torch.ops.aten._to_copy.default
            and args[0].is_meta
            and kwargs.get("device") not in (None, META)
        ):
            return torch.zeros(
                args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype, device=kwargs["device"]
            )
        return func(*args, **kwargs)


def on_meta_only(model) -> bool:
    return {p.device for p in model.parameters()} == {META}


@pytest.mark.parametrize("lora", [None, LoraConfig(r=2, alpha=4)])
def test_policy_and_reference_load_onto_the_device(on_meta, paths, lora):
    from alignment.stages.common import load_policy_and_reference

    _, policy, reference = load_policy_and_reference(paths.sft, lora)
    assert on_meta_only(policy) and on_meta_only(reference)


def test_rest_policy_and_sft_load_onto_the_device(on_meta, paths):
    from alignment.config import RestConfig
    from alignment.stages.rest_iter import load_policy

    policy, sft = load_policy(paths.sft, paths, RestConfig())
    assert on_meta_only(policy) and on_meta_only(sft)


def test_reward_model_scores_on_the_device(on_meta, paths):
    from alignment.models.reward_model import RewardScorer
    from alignment.training import distributed

    scorer = RewardScorer(paths.sft, device=distributed.device())
    assert on_meta_only(scorer.model)
    seen = called_on(scorer.model)
    # the score is read at each row's last real token, after a check that every row has one: no data
    with pytest.raises(RuntimeError, match=r"Tensor.item\(\) cannot be called on meta tensors"):
        scorer(["The film", "I hated"], [" was a joy.", " it."], [True, False])
    assert seen and set(seen) == {META}


def test_kl_to_reference_scores_on_the_models_device(tokenizer):
    from alignment.evaluation.heldout import kl_to_reference

    policy, reference = tiny(tokenizer).to(META), tiny(tokenizer).to(META)
    seen = called_on(policy, reference)
    samples = [
        (tokenizer("The film").input_ids, tokenizer(" was a joy.").input_ids + [tokenizer.eos_token_id])
    ]
    with HostSeesZeros():
        kl = kl_to_reference(policy, reference, samples)
    # each model: ids, mask and the positions whose logits it forms
    assert kl.shape == (1,) and len(seen) == 6 and set(seen) == {META}


def test_dpo_reference_logps_are_computed_on_the_device(on_meta, tokenizer):
    from alignment.data.preference_data import collate_pairs, encode_pair
    from alignment.stages.dpo import precompute_reference

    reference = tiny(tokenizer).to(META)
    seen = called_on(reference)
    pair = {"prompt": "The film", "chosen": " was a joy.", "rejected": " was dull."}
    examples = [encode_pair(tokenizer, pair, max_length=32)]
    with HostSeesZeros():
        precompute_reference(reference, examples, collate_pairs(tokenizer.pad_token_id), batch_size=4)
    assert examples[0]["reference_logps"] == (0.0, 0.0) and seen and set(seen) == {META}


def test_the_local_judge_loads_onto_the_device_and_feeds_it(on_meta, paths):
    from alignment.evaluation.local_judge import TransformersJudgeBackend

    backend = TransformersJudgeBackend(paths.sft)
    assert on_meta_only(backend.model)
    seen = called_on(backend.model)
    chats = [[{"role": "user", "content": f"The film {word}"}] for word in ("was a joy", "bored me")]
    with HostSeesZeros():
        probabilities = backend.probabilities(chats)
    assert probabilities.shape == (2, 3) and seen and set(seen) == {META}


# a device named in the code: torch.device("cuda"...), .to("cpu"), device="cuda", .cuda()
HARD_CODED = re.compile(r"""(torch\.device\(|\.to\(|device\s*=\s*)["'](cpu|cuda)|\.cuda\(\)""")
KNOWN = {
    "bench.py": "a benchmark CLI: its --device names the device",
}


def test_no_device_is_named_in_the_package():
    package = Path(distributed.__file__).parent
    found = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name not in KNOWN
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if HARD_CODED.search(line)
    ]
    assert found == []


def test_the_sampler_asks_whether_rows_ended_every_k_tokens_with_the_same_samples(tokenizer):
    """On a GPU `done.all()` makes the host wait, so the sampler asks every 8 tokens there; a row's tokens
    after its EOS are discarded and rows draw independently, so the samples are those of k = 1 (CPU's
    default): with per-prompt seeds across batches, with the shared RNG within one batch."""
    model, eos = tiny(tokenizer), tokenizer.eos_token_id
    bias = torch.zeros(len(tokenizer)).index_fill_(0, torch.tensor([eos]), 4.0)
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + bias)  # most end early
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    prompts = ["The film", "I hated", "Blue", "every minute"]
    seeds = [prompt_seed(0, p) for p in prompts]

    def sample(check_every, **kwargs):
        torch.manual_seed(0)
        forwards.clear()
        samples = generate_ids(model, tokenizer, prompts, 24, check_every=check_every, **kwargs)
        return samples, len(forwards)

    for kwargs in ({"seeds": seeds, "batch_size": 2}, {}):
        (every, every_forwards), (eighth, eighth_forwards) = sample(1, **kwargs), sample(8, **kwargs)
        assert eighth == every
        assert max(len(response) for _, response in every) < 24  # every batch stopped early ...
        assert eighth_forwards > every_forwards  # ... and later when asked less often
        assert sample(None, **kwargs) == (every, every_forwards)  # CPU's default: every token
