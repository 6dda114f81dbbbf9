"""The BRAIn stage on the micro pipeline, in-process: samples, refreshes, metrics, exact resume."""

import json

import pytest
import torch

from alignment.paths import Paths
from alignment.stages import brain
from flows.config import parse
from tests.conftest import MICRO_PARAMS


class Killed(Exception):
    pass


def run_brain(root, monkeypatch, kill_after: int | None = None, **overrides) -> dict:
    cfg = parse("brain", {**MICRO_PARAMS["brain"], **overrides})
    if kill_after is not None:
        real_train = brain.train

        def train_then_die(*args, on_step, **kwargs):
            def hook(done):
                on_step(done)
                if done == kill_after:
                    raise Killed

            return real_train(*args, on_step=hook, **kwargs)

        monkeypatch.setattr(brain, "train", train_then_die)
    monkeypatch.chdir(root)
    try:
        return brain.run(cfg, Paths(root), None)
    finally:
        monkeypatch.undo()


def weights(root) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(root / "outputs/brain/model.safetensors")


def test_brain_trains_refreshes_and_resumes_exactly(upstream, monkeypatch):
    root = upstream
    metrics = run_brain(root, monkeypatch)
    assert metrics["steps"] == 4
    assert {
        "gold/reward",
        "gold/sft_reward",
        "rm/win_rate_vs_sft",
        "objective/kl",
        "eval/brain/ess",
        "eval/loss",
    } <= set(metrics)
    assert 1.0 <= metrics["eval/brain/ess"] <= 3.0
    history = json.loads((root / "metrics/brain.json").read_text())
    assert history["steps"] == 4
    train_csv = (root / "plots/brain/train.csv").read_text().splitlines()
    assert train_csv[0].startswith("step,loss,brain/ess_fraction") and len(train_csv) == 5
    # the samples travel inside the checkpoint: step 4's hold the SFT draw and the refresh at step 2
    # (not at 4: training ends there), and no side files are left
    checkpoints = root / "checkpoints/brain"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.json", "step_0000004"]
    refreshed = torch.load(checkpoints / "step_0000004/state.pt", weights_only=True)["extra"]
    assert (refreshed["drawn_at"][:, -1] == 2).all() and (refreshed["drawn_at"][:, 0] == 0).all()
    uninterrupted = weights(root)

    # killed after step 3 (the last checkpoint and refresh at 2), then resumed: the same weights
    for path in (root / "checkpoints/brain").iterdir():
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
    with pytest.raises(Killed):
        run_brain(root, monkeypatch, kill_after=3)
    resumed = run_brain(root, monkeypatch)
    assert resumed["steps"] == 4
    for name, tensor in weights(root).items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=0, atol=0, msg=name)


def test_ablations_run(upstream, monkeypatch):
    for overrides in (
        {"baseline": "none"},
        {"self_normalize": False},
        {"likelihood": "bradley_terry", "reward_beta": 1.0},
    ):
        metrics = run_brain(
            upstream, monkeypatch, **overrides, train={**MICRO_PARAMS["brain"]["train"], "max_steps": 2}
        )
        assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["train/loss"]))
