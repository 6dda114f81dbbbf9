"""The shared training loop: prompt masking, the accumulation invariant and exact resume."""

import pytest
import torch

from alignment.config import ModelConfig, TrainConfig
from alignment.data.batching import collate, encode
from alignment.losses.logprobs import IGNORE_INDEX
from alignment.models.loading import build_model, train_tokenizer
from alignment.training.trainer import (
    count_response_tokens,
    example_length,
    make_optimizer,
    prepare_model,
    train,
    window_indices,
)
from alignment.training.trainer import nll_step as step

TEXTS = [
    ("The film was", " a joy from start to finish, and the cast shines."),
    ("\n\nHuman: What is two plus two?\n\nAssistant:", " Four."),
    ("I hated", " every minute of it; the plot made no sense at all."),
    ("\n\nHuman: Name a colour.\n\nAssistant:", " Blue, like the sky on a clear day."),
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((p + r for p, r in TEXTS), vocab_size=300, min_frequency=1)


def tiny_model(tokenizer, dropout=0.0):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_embd=16, n_head=2, max_position_embeddings=64, dropout=dropout)
    return build_model(cfg, tokenizer)


def examples(tokenizer):
    return [encode(tokenizer, p, r, max_length=64, finished=True) for p, r in TEXTS]


def run(tokenizer, cfg: TrainConfig, model=None, **kwargs):
    model = model or tiny_model(tokenizer)
    result = train(
        model,
        examples(tokenizer),
        collate(tokenizer.pad_token_id),
        step,
        count_response_tokens,
        cfg,
        **kwargs,
    )
    return model, result


def test_prompt_tokens_carry_no_loss(tokenizer):
    prompt, response = TEXTS[1]
    example = encode(tokenizer, prompt, response, max_length=64, finished=True)
    n_prompt = len(tokenizer(prompt).input_ids)
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id  # the response ends with EOS
    assert tokenizer.decode(example["input_ids"][n_prompt:-1]) == response


def test_overlong_examples_keep_the_latest_prompt_and_some_response(tokenizer):
    prompt, response = "\n\nHuman: " + "blah " * 100 + "\n\nAssistant:", " A reply."
    example = encode(tokenizer, prompt, response, max_length=32, finished=True)
    assert len(example["input_ids"]) == 32
    assert tokenizer.decode(example["input_ids"]).endswith("Assistant: A reply.<|endoftext|>")


def test_windows_are_a_pure_function_of_seed_and_epoch():
    assert window_indices(10, 2, 2, seed=1, epoch=0) == window_indices(10, 2, 2, seed=1, epoch=0)
    assert window_indices(10, 2, 2, seed=1, epoch=0) != window_indices(10, 2, 2, seed=1, epoch=1)
    windows = window_indices(10, 2, 2, seed=1, epoch=0)
    assert len(windows) == 2 and all(len(w) == 4 for w in windows)  # the incomplete window is dropped


def test_length_grouped_windows_train_the_same_examples_with_less_padding():
    """Hand-worked: 8 examples of lengths 10, 11, ..., 17 in windows of 2, grouped in runs of 2 windows:
    each run's 4 examples sorted longest first and cut into 2 windows again; the 4 windows shuffled."""
    lengths = [10 + i for i in range(8)]
    plain = window_indices(8, 2, 1, seed=3, epoch=0)
    grouped = window_indices(8, 2, 1, seed=3, epoch=0, lengths=lengths, group=2)
    expected = set()
    for run in (plain[0] + plain[1], plain[2] + plain[3]):
        run = sorted(run, reverse=True)  # length = 10 + index: longest first is the largest index first
        expected |= {tuple(run[:2]), tuple(run[2:])}
    assert {tuple(w) for w in grouped} == expected and len(grouped) == 4
    assert grouped == window_indices(8, 2, 1, seed=3, epoch=0, lengths=lengths, group=2)  # pure

    # long-tailed lengths, as HH's: far less padding (each window padded to its longest), same examples
    torch.manual_seed(0)
    lengths = (torch.distributions.Exponential(0.02).sample((2000,)) + 8).long().tolist()

    def padding(windows):
        return sum(len(w) * max(lengths[i] for i in w) - sum(lengths[i] for i in w) for w in windows)

    plain = window_indices(2000, 8, 1, seed=0, epoch=0)
    grouped = window_indices(2000, 8, 1, seed=0, epoch=0, lengths=lengths, group=50)
    assert sorted(i for w in grouped for i in w) == sorted(i for w in plain for i in w)
    assert padding(grouped) < 0.2 * padding(plain)
    with pytest.raises(ValueError, match="one length per example"):
        window_indices(8, 2, 1, seed=0, epoch=0, lengths=[1, 2], group=2)


def test_group_by_length_needs_examples_with_tokens(tokenizer):
    from alignment.config import BRAInConfig

    with pytest.raises(ValueError, match="group_by_length"):
        BRAInConfig(train={"group_by_length": 4})
    with pytest.raises(ValueError, match="no input_ids"):
        train(
            tiny_model(tokenizer),
            [{"index": i} for i in range(8)],
            None,
            step,
            count_response_tokens,
            TrainConfig(batch_size=2, group_by_length=2),
        )
    # a pair's length is both rows'
    assert example_length({"chosen": {"input_ids": [1, 2, 3]}, "rejected": {"input_ids": [1, 2]}}) == 5


def test_batch_8_x_accumulation_1_equals_batch_1_x_accumulation_8(tokenizer):
    """Token-normalised accumulation: the same examples make the same update however they are split
    (examples differ in length, so a per-micro-batch mean would fail this)."""
    base = dict(
        max_steps=3,
        learning_rate=1e-2,
        warmup_steps=0,
        lr_schedule="constant",
        max_grad_norm=None,
        log_every=1,
    )
    big, big_result = run(tokenizer, TrainConfig(batch_size=8, grad_accum=1, **base))
    small, small_result = run(tokenizer, TrainConfig(batch_size=1, grad_accum=8, **base))
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert [r["loss"] for r in big_result.history] == pytest.approx(
        [r["loss"] for r in small_result.history], rel=1e-5
    )
    # and the training really moved the weights
    assert not torch.allclose(next(big.parameters()), next(tiny_model(tokenizer).parameters()))


class Killed(Exception):
    pass


def test_stopped_and_resumed_run_ends_with_the_same_weights(tokenizer, tmp_path):
    """Killed after step 5 with the last checkpoint at step 4: resuming redoes step 5 and goes on.
    Dropout is on, so the RNG state must come back too; two epochs cross an epoch boundary."""
    cfg = TrainConfig(
        batch_size=2,
        grad_accum=2,
        epochs=2,
        max_steps=7,
        checkpoint_every=2,
        learning_rate=5e-3,
        warmup_steps=2,
        log_every=1,
    )
    straight, straight_result = run(tokenizer, cfg, model=tiny_model(tokenizer, dropout=0.2))

    def kill_after_5(done: int) -> None:
        if done == 5:
            raise Killed

    with pytest.raises(Killed):
        run(
            tokenizer,
            cfg,
            model=tiny_model(tokenizer, dropout=0.2),
            checkpoint_dir=tmp_path,
            fingerprint="a",
            on_step=kill_after_5,
        )
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_0000004"]
    resumed, result = run(
        tokenizer, cfg, model=tiny_model(tokenizer, dropout=0.2), checkpoint_dir=tmp_path, fingerprint="a"
    )
    assert result.resumed_from == 4
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the curves logged before the kill come back with the checkpoint: the report covers every step
    assert [r["step"] for r in result.history] == list(range(1, 8))
    assert [r["loss"] for r in result.history] == [r["loss"] for r in straight_result.history]


def test_a_checkpoint_of_other_settings_is_not_resumed(tokenizer, tmp_path):
    cfg = TrainConfig(batch_size=4, max_steps=2, checkpoint_every=1, log_every=1)
    run(tokenizer, cfg, checkpoint_dir=tmp_path, fingerprint="a")
    _, result = run(tokenizer, cfg, checkpoint_dir=tmp_path, fingerprint="b")
    assert result.resumed_from == 0
    _, result = run(tokenizer, cfg, checkpoint_dir=tmp_path, fingerprint="b")  # b's own checkpoint
    assert result.resumed_from == 2


def test_too_little_data_for_one_step_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        run(tokenizer, TrainConfig(batch_size=64))


def test_gradient_checkpointing_and_compile_train_to_the_same_weights(tokenizer, monkeypatch):
    """The GPU knobs change how a step is computed, not what it computes (dropout off: the recomputed
    forward is the same one). torch.compile through `aot_eager`: dynamo and AOTAutograd trace the model,
    forward and backward, as on a GPU, without inductor's minutes of C++ compilation on a CPU."""
    import functools

    compiled = []
    compile_ = functools.partial(torch.compile, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or compile_(model))
    base = dict(batch_size=4, max_steps=2, learning_rate=1e-2, warmup_steps=0, log_every=1)
    plain, plain_result = run(tokenizer, TrainConfig(**base))
    for knob in ("gradient_checkpointing", "compile"):
        model, result = run(tokenizer, TrainConfig(**base, **{knob: True}))
        assert model.is_gradient_checkpointing == (knob == "gradient_checkpointing")
        assert compiled == ([model] if knob == "compile" else [])
        for a, b in zip(plain.parameters(), model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert [r["loss"] for r in result.history] == pytest.approx([r["loss"] for r in plain_result.history])
    assert not torch.allclose(next(plain.parameters()), next(tiny_model(tokenizer).parameters()))


def test_gradient_checkpointing_trains_a_lora_adapter(tokenizer):
    """Under a frozen base no layer input needs a gradient: the adapter must still get its gradients."""
    from alignment.config import LoraConfig
    from alignment.models.lora import add_adapter

    cfg = dict(batch_size=4, max_steps=1, learning_rate=1e-2, warmup_steps=0)
    lora = LoraConfig(r=2, alpha=4)
    plain, _ = run(tokenizer, TrainConfig(**cfg), model=add_adapter(tiny_model(tokenizer), lora))
    checkpointed, _ = run(
        tokenizer,
        TrainConfig(**cfg, gradient_checkpointing=True),
        model=add_adapter(tiny_model(tokenizer), lora),
    )
    assert checkpointed.is_gradient_checkpointing
    moved = 0
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved += "lora_B" in name and bool(a.abs().sum() > 0)  # lora_B starts at zero
    assert moved > 0


def test_a_model_without_gradient_checkpointing_is_a_clear_error():
    with pytest.raises(ValueError, match="gradient_checkpointing: Linear does not support it"):
        prepare_model(torch.nn.Linear(2, 2), TrainConfig(gradient_checkpointing=True))


def test_fused_adamw_follows_the_device():
    params = [torch.nn.Parameter(torch.zeros(2))]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # auto: torch's default on a CPU (what every run did before the knob), the fused kernel on a GPU
    assert make_optimizer(params, TrainConfig(), cpu).defaults["fused"] is None
    assert make_optimizer(params, TrainConfig(), cuda).defaults["fused"] is True
    assert make_optimizer(params, TrainConfig(fused_adamw="off"), cuda).defaults["fused"] is None
    with pytest.raises(ValueError, match="fused_adamw: on needs a GPU, but the parameters train on cpu"):
        make_optimizer(params, TrainConfig(fused_adamw="on"), cpu)
    # parameter groups with their own learning rate (PPO's policy and critic)
    groups = make_optimizer([{"params": params, "lr": 0.5}], TrainConfig(learning_rate=0.1), cpu).param_groups
    assert groups[0]["lr"] == 0.5


def test_a_constant_schedule_warms_up(tokenizer):
    """lr_schedule constant with warmup_steps: the rate climbs for `warmup_steps`, then stays (transformers'
    own `constant` ignores warmup; both shipped ReST configs ask for it)."""
    cfg = TrainConfig(
        batch_size=4,
        epochs=2,
        max_steps=6,
        lr_schedule="constant",
        warmup_steps=4,
        learning_rate=1e-3,
        log_every=1,
    )
    _, result = run(tokenizer, cfg)
    rates = [row["learning_rate"] for row in result.history]
    assert rates[:3] == pytest.approx([2.5e-4, 5e-4, 7.5e-4]) and rates[3:] == pytest.approx([1e-3] * 3)


def test_a_window_without_response_tokens_trains_on_nothing_and_logs_no_nan(tokenizer):
    """Every example's response cut away (labels all IGNORE_INDEX): the window's loss is 0, its gradient
    0, and the logged numbers finite (0 / 0 was NaN)."""
    empty = [{**e, "labels": [IGNORE_INDEX] * len(e["labels"])} for e in examples(tokenizer)]
    model = tiny_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(batch_size=4, max_steps=2, log_every=1, learning_rate=1e-2)
    result = train(model, empty, collate(tokenizer.pad_token_id), step, count_response_tokens, cfg)
    assert all(row["loss"] == 0 and row["grad_norm"] == 0 for row in result.history)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
