"""The checkpoint module: atomic pointer, resumes that survive a damaged pointer, fingerprints, several
processes, weights_only-safe PPO state, and the trainer's `extra_state`."""

import json
import random
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alignment.config import ModelConfig, TrainConfig
from alignment.models.loading import build_model, train_tokenizer
from alignment.stages import ppo
from alignment.training import checkpoint, online
from alignment.training.online_methods import PPO
from flows.config import parse
from tests.unit.test_trainer import TEXTS, run


def write_marker(text: str):
    def write(folder: Path) -> None:
        (folder / "marker.txt").write_text(text)

    return write


def save(root: Path, step: int, fingerprint: str = "a", **kwargs) -> Path:
    return checkpoint.save(root, step, fingerprint, write_marker(f"step {step}"), **kwargs)


def loaded_marker(root: Path, fingerprint: str = "a") -> str | None:
    found = checkpoint.load(root, fingerprint)
    return None if found is None else (found[0] / "marker.txt").read_text()


def test_save_keeps_one_complete_step_folder_and_the_callers_meta(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4, meta={"history": [{"step": 4, "loss": 0.5}], "run_id": "abc"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_0000004"]
    folder, meta = checkpoint.load(tmp_path, "a")
    assert folder == tmp_path / "step_0000004" and (folder / "marker.txt").read_text() == "step 4"
    assert meta == {"step": 4, "fingerprint": "a", "history": [{"step": 4, "loss": 0.5}], "run_id": "abc"}


def test_a_truncated_pointer_falls_back_to_the_newest_complete_folder(tmp_path):
    save(tmp_path, 2)
    pointer = tmp_path / "latest.json"
    text = pointer.read_text()
    pointer.write_text(text[: len(text) // 2])  # a kill mid-write, as the old in-place write allowed
    assert loaded_marker(tmp_path) == "step 2"
    pointer.write_text("[1, 2")
    (tmp_path / "step_0000002" / "meta.json").write_text('{"step": 2, "finger')  # and a damaged meta
    assert loaded_marker(tmp_path) is None  # nothing complete is left: start fresh, without a crash


def test_a_pointer_to_a_missing_folder_falls_back(tmp_path):
    save(tmp_path, 2)
    (tmp_path / "latest.json").write_text(json.dumps({"path": "step_0000009", "step": 9}))
    assert loaded_marker(tmp_path) == "step 2"


def test_the_pointer_is_replaced_atomically(tmp_path, monkeypatch):
    """Killed between writing the new pointer's temp file and moving it into place: the old pointer
    still reads and names its complete folder, and the next save goes through."""
    save(tmp_path, 2)
    real_replace = checkpoint.os.replace

    def die(source, destination):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 4)
    assert json.loads((tmp_path / "latest.json").read_text()) == {"path": "step_0000002", "step": 2}
    assert loaded_marker(tmp_path) == "step 2"
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    save(tmp_path, 6)
    assert loaded_marker(tmp_path) == "step 6"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_0000006"]


def test_a_save_killed_mid_write_leaves_the_old_checkpoint_and_no_debris(tmp_path):
    save(tmp_path, 2)

    def die_halfway(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half a mo")
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 4, "a", die_halfway)
    assert loaded_marker(tmp_path) == "step 2"
    save(tmp_path, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_0000006"]


def test_a_checkpoint_of_another_fingerprint_is_ignored(tmp_path):
    save(tmp_path, 2, fingerprint="a")
    assert checkpoint.load(tmp_path, "b") is None
    save(tmp_path, 2, fingerprint="b")  # the same step of other settings is replaced
    assert checkpoint.load(tmp_path, "a") is None
    assert checkpoint.load(tmp_path, "b")[1]["fingerprint"] == "b"
    assert checkpoint.load(tmp_path / "nothing_here", "a") is None


def test_every_process_writes_its_share_and_only_the_main_one_points(tmp_path, monkeypatch):
    """Two 'processes' as threads behind a real barrier, each writing its own file, as every process of a
    launch writes its RNG state (and, sharded, its shard)."""
    barrier = threading.Barrier(2, timeout=10)
    local = threading.local()
    processes = SimpleNamespace(is_main=lambda: local.rank == 0, barrier=barrier.wait)
    monkeypatch.setattr(checkpoint, "distributed", processes)
    errors = []

    def process(rank: int) -> None:
        local.rank = rank
        try:
            for step in (2, 4):
                checkpoint.save(
                    tmp_path,
                    step,
                    "a",
                    lambda f: (f / f"rank_{rank}.txt").write_text(str(step)),
                    {"rank": rank},
                )
        except Exception as error:  # noqa: BLE001 - reported below, from the test's own thread
            errors.append(error)

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    folder, meta = checkpoint.load(tmp_path, "a")
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "rank_0.txt", "rank_1.txt"]
    assert meta["rank"] == 0 and (folder / "rank_1.txt").read_text() == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_0000004"]


def tiny_policy():
    tokenizer = train_tokenizer((p + r for p, r in TEXTS), vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    return build_model(ModelConfig(n_layer=1, n_embd=16, n_head=2, max_position_embeddings=32), tokenizer)


def draws() -> tuple:
    return random.random(), np.random.randn(), np.random.randint(2**31), torch.rand(3).tolist()


def test_online_checkpoint_loads_weights_only_and_restores_every_rng(tmp_path):
    """The online loop's checkpoint (PPO with a value head on the policy): models, AdamW, the method's KL
    controller and every RNG, loadable with weights_only=True."""
    from alignment.config import OptimizerConfig
    from alignment.training.engine import Engine

    engine = Engine(OptimizerConfig())
    policy = tiny_policy()
    state = online.PolicyAndCritic(policy, online.TokenValues(ppo.PolicyValueHead(policy)))
    optimizer = torch.optim.AdamW(
        [{"params": policy.parameters()}, {"params": state.critic.critic.score.parameters()}]
    )
    policy(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()  # optimizer state with tensors in it
    method = PPO(parse("ppo", {"kl_target": 6.0, "kl_coef": 0.1}))
    method.kl_control.update(12.0, 256)
    history = [{"step": 1, "objective/kl": 0.25, "val/num_eos_tokens": 3}]
    np.random.randn()  # numpy now holds a cached gaussian too

    online.save_checkpoint(engine, tmp_path, "a", 1, state, optimizer, method, history)
    saved = torch.load(tmp_path / "step_0000001" / "state.pt", weights_only=True)  # no pickled numpy or code
    assert set(saved) == {"model", "optimizer", "extra"} and set(saved["extra"]) == {"method"}
    assert (tmp_path / "step_0000001" / "rng_0.pt").is_file()
    expected = draws()

    fresh = tiny_policy()
    fresh_state = online.PolicyAndCritic(fresh, online.TokenValues(ppo.PolicyValueHead(fresh)))
    fresh_optimizer = torch.optim.AdamW(
        [{"params": fresh.parameters()}, {"params": fresh_state.critic.critic.score.parameters()}]
    )
    fresh_method = PPO(parse("ppo", {"kl_target": 6.0, "kl_coef": 0.1}))
    folder, meta = checkpoint.load(tmp_path, "a")
    fresh_method.load_state_dict(engine.load_state(folder, fresh_state, fresh_optimizer)["method"])
    assert (meta["step"], meta["history"]) == (1, history)
    assert draws() == expected
    assert fresh_method.kl_control.value == method.kl_control.value != 0.1
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    for a, b in zip(policy.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class Killed(Exception):
    pass


def test_trainer_extra_state_is_saved_after_on_step_and_restored_before_on_start(tmp_path):
    """A stage's state at the checkpoint of step k is its state after on_step(k)."""
    tokenizer = train_tokenizer((p + r for p, r in TEXTS), vocab_size=300, min_frequency=1)
    cfg = TrainConfig(batch_size=4, max_steps=4, checkpoint_every=2, log_every=1)
    stage = {"refreshed_at": [], "started_with": None}

    def on_step(done: int) -> None:
        stage["refreshed_at"].append(done)
        if done == 3:
            raise Killed

    def on_start(step: int) -> None:
        stage["started_with"] = (step, list(stage["refreshed_at"]))

    extra = (
        lambda: {"refreshed_at": torch.tensor(stage["refreshed_at"])},
        lambda saved: stage.update(refreshed_at=saved["refreshed_at"].tolist()),
    )
    kwargs = dict(checkpoint_dir=tmp_path, fingerprint="a", on_start=on_start, extra_state=extra)
    with pytest.raises(Killed):
        run(tokenizer, cfg, on_step=on_step, **kwargs)
    stage["refreshed_at"] = ["lost with the process"]
    _, result = run(tokenizer, cfg, on_step=lambda done: stage["refreshed_at"].append(done), **kwargs)
    assert result.resumed_from == 2 and stage["started_with"] == (2, [1, 2])
    assert stage["refreshed_at"] == [1, 2, 3, 4]


def test_checkpoints_on_shared_storage_link_and_move(tmp_path, monkeypatch):
    """ALIGNMENT_CHECKPOINTS_DIR: checkpoints/<stage> becomes a link into the shared folder, keyed by the
    run's fingerprint; a local checkpoint moves there when the shared one is empty, and a second checkout
    of the same run finds it, while a run of other settings gets a folder of its own."""
    from alignment.__main__ import link_checkpoints

    local = tmp_path / "a" / "checkpoints" / "dpo"
    assert link_checkpoints(local, shared="").is_dir() and not local.is_symlink()  # unset: a folder
    (local / "latest.json").write_text("{}")
    monkeypatch.setenv("ALIGNMENT_CHECKPOINTS_DIR", str(tmp_path / "shared"))
    link_checkpoints(local, "f1")
    assert local.is_symlink() and (tmp_path / "shared" / "dpo" / "f1" / "latest.json").read_text() == "{}"
    other = tmp_path / "b" / "checkpoints" / "dpo"  # another worker's checkout, same run
    other.mkdir(parents=True)
    (other / "stale.json").write_text("{}")
    link_checkpoints(other, "f1")
    assert sorted(p.name for p in other.iterdir()) == ["latest.json"]  # the shared one wins
    assert link_checkpoints(other, "f1") == other and other.is_symlink()  # idempotent
    # another run of the stage (other settings) on the same share: its own folder, the first one kept
    third = tmp_path / "c" / "checkpoints" / "dpo"
    link_checkpoints(third, "f2")
    assert third.resolve() == tmp_path / "shared" / "dpo" / "f2" and not any(third.iterdir())
    assert (tmp_path / "shared" / "dpo" / "f1" / "latest.json").exists()
    with pytest.raises(ValueError, match="fingerprint"):
        link_checkpoints(third, None)
