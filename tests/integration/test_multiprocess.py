"""Several processes, one result. The stages below run once as 1 process x batch b and twice as 2 processes
(torchrun, gloo) x batch b/2: replicated (DDP) and sharded (FSDP2, the project's own fully_shard: the code a
GPU launch with configs/accelerate/fsdp2.yaml runs), each chain in one launch on the same upstream outputs.
Each must train the weights of one process, draw the same samples, write each output once (from the main
process) and log one MLflow run per stage and one registered version per model. A 2-process stage killed
with SIGKILL mid-stage resumes from its checkpoint to the weights of the run that was never interrupted,
replicated and sharded."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import MICRO_PARAMS
from launching import (
    fork,
    launch,
    max_abs_difference,
    other_ranks_writes,
    relative_difference,
    weights,
)

pytestmark = pytest.mark.slow

CHAIN = ["pairs", "sft", "rm", "dpo", "simpo", "brain", "ppo", "grpo", "rloo", "rest_iter@1", "evaluate"]
# stage -> its model folder
MODELS = {
    "sft": "outputs/sft",
    "rm": "outputs/rm",
    "dpo": "outputs/dpo",
    "simpo": "outputs/simpo",
    "brain": "outputs/brain",
    "ppo": "outputs/ppo",
    "grpo": "outputs/grpo",
    "rloo": "outputs/rloo",
    "rest_iter@1": "outputs/rest/1/policy",
}
LAUNCHES = {"ddp": None, "fsdp2": "fsdp2"}  # 2 processes: replicated, sharded


def chain_params(processes: int) -> dict:
    """Micro params with the global batch of every trained stage fixed: per-process batch x processes."""
    params = copy.deepcopy(MICRO_PARAMS)
    for section, batch in (("sft", 8), ("rm", 8), ("dpo", 8), ("simpo", 8), ("brain", 2)):
        params[section]["train"]["batch_size"] = batch // processes
    params["ppo"] |= {"rollout_batch_size": 4 // processes, "minibatch_size": 2 // processes}
    for section in ("grpo", "rloo"):  # a group of 3 samples stays on the process that drew it
        params[section] |= {"prompts_per_batch": 2 // processes, "minibatch_size": 6 // processes}
    params["rest"]["improve"]["train"]["batch_size"] = 2 // processes
    # a Bradley-Terry loss is blind to a shift of every reward: the final norm's bias gets exactly zero
    # gradient, and Adam turns the float noise of summing it in another order into steps of +-lr; the
    # centering term (TRL's center_rewards_coefficient) gives that direction a gradient of its own
    params["rm"]["center_coefficient"] = 0.01
    return params


@pytest.fixture(scope="module")
def launched(upstream, tmp_path_factory) -> dict:
    """The chain as one process, and as two processes replicated and sharded: three launches side by side
    (the module takes the time of the slowest)."""
    root = tmp_path_factory.mktemp("chains")
    projects = {"one": fork(upstream, root / "one", chain_params(1))}
    projects |= {name: fork(upstream, root / name, chain_params(2)) for name in LAUNCHES}
    for project in projects.values():  # what other tests left in `upstream`: none of it is resumed
        shutil.rmtree(project / "checkpoints")
    runs = [(projects["one"], CHAIN, 1)] + [
        (projects[name], CHAIN, 2, True, None, True, 900, sharding) for name, sharding in LAUNCHES.items()
    ]
    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(lambda args: launch(*args), runs))
    return projects


@pytest.fixture(scope="module", params=list(LAUNCHES))
def chains(launched, request):
    """(one process, two processes) for each way of launching two."""
    return launched["one"], launched[request.param]


@pytest.mark.parametrize("stage", list(MODELS))
def test_two_processes_train_the_weights_of_one(chains, stage):
    one, two = chains
    a, b = weights(one / MODELS[stage]), weights(two / MODELS[stage])
    relative, most = relative_difference(a, b), max_abs_difference(a, b)
    print(f"{two.name} {stage}: relative {relative:.1e}, max abs {most:.1e}")
    assert relative < 1e-5  # the criterion: L2 over all parameters
    # and no single weight off by more than float noise that Adam's normalised steps can amplify on a
    # parameter whose gradient is about 0 (lr 1e-3 at most here)
    assert most < 1e-4


def test_brain_draws_and_scores_the_samples_of_one_process(chains):
    """The SFT draw and the policy's refresh at step 2, as the last checkpoint holds them."""
    stores = [
        torch.load(p / "checkpoints/brain/step_0000004/state.pt", weights_only=True)["extra"] for p in chains
    ]
    for key in ("prompt_ids", "response_ids"):
        assert stores[0][key] == stores[1][key]
    assert torch.equal(stores[0]["drawn_at"], stores[1]["drawn_at"])
    for key in ("proposal_logps", "sft_logps", "rewards"):
        torch.testing.assert_close(stores[0][key], stores[1][key], rtol=0, atol=1e-5, msg=key)


def rows(path, keys):
    return [{k: row[k] for k in keys} for row in map(json.loads, path.read_text().splitlines())]


@pytest.mark.parametrize(
    "file, keys",
    [
        ("outputs/pairs/samples_train.jsonl", ("prompt", "response", "gold")),
        ("outputs/pairs/train.jsonl", ("prompt", "chosen", "rejected")),
        ("outputs/rest/1/grown.jsonl", ("prompt", "index", "response_ids")),
        ("outputs/evaluate/responses.jsonl", ("prompt", "sft", "dpo")),
    ],
)
def test_two_processes_draw_the_samples_of_one(chains, file, keys):
    one, two = chains
    assert rows(one / file, keys) == rows(two / file, keys)
    assert len(rows(two / file, keys)) > 0


def test_one_writer_one_run_per_stage_one_version_per_model(chains):
    _, two = chains
    assert other_ranks_writes(two) == []
    with sqlite3.connect(two / "mlflow.db") as db:
        runs = dict(
            db.execute("select value, count(*) from tags where key = 'stage' group by value").fetchall()
        )
        versions = dict(db.execute("select name, count(*) from model_versions group by name").fetchall())
        processes = {v for (v,) in db.execute("select value from tags where key = 'num_processes'")}
    assert runs == {stage: 1 for stage in CHAIN}
    registered = ("sft", "rm", "dpo", "simpo", "brain", "ppo", "grpo", "rloo")
    assert versions == {f"alignment-{stage}": 1 for stage in registered}
    assert processes == {"2"}


def test_a_sharded_run_saves_whole_models_that_load_alone(launched):
    """FSDP2 gathers the shards into one model folder that plain transformers loads, and its checkpoints
    hold each process's shards (torch distributed checkpoint), not rank 0's state alone."""
    from transformers import AutoModelForCausalLM

    sharded = launched["fsdp2"]
    model = AutoModelForCausalLM.from_pretrained(sharded / "outputs/dpo")
    assert sorted(dict(model.named_parameters())) == sorted(weights(launched["one"] / "outputs/dpo"))
    step = sorted((sharded / "checkpoints/dpo").glob("step_*"))[-1]
    assert (step / "sharded" / ".metadata").is_file() and len(list((step / "sharded").glob("*.distcp"))) == 2
    assert {p.name for p in step.glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}


def test_a_killed_two_process_stage_resumes_to_the_same_weights(chains, tmp_path):
    _, two = chains
    sharding = LAUNCHES[two.name]
    params = chain_params(2)
    params["dpo"]["train"]["checkpoint_every"] = 1
    project = fork(two, tmp_path / "killed", params)
    for name in ("outputs/dpo", "checkpoints/dpo"):
        subprocess.run(["rm", "-rf", str(project / name)], check=True)
    # SIGKILL to the launcher and both processes the moment one of them starts writing step 2's checkpoint
    killed = launch(
        project, ["dpo"], 2, kill_when_opening=".step_0000002.partial", check=False, sharding=sharding
    )
    assert killed.returncode == -signal.SIGKILL
    assert (project / "checkpoints/dpo/step_0000001").is_dir()
    assert not (project / "outputs/dpo/model.safetensors").exists()

    resumed = launch(project, ["dpo"], 2, sharding=sharding)
    assert "resumed from" in resumed.stderr
    a, b = weights(two / "outputs/dpo"), weights(project / "outputs/dpo")
    print(f"resumed dpo: relative {relative_difference(a, b):.1e}, max abs {max_abs_difference(a, b):.1e}")
    assert relative_difference(a, b) < 1e-6


def test_a_lora_adapter_trains_the_same_under_ddp(upstream, tmp_path):
    """LoRA DPO, 1 process x batch 8 against DDP's 2 x 4: the same adapter (its A is drawn from the train
    seed alone; drawn from the global RNG, whatever ran before in each process decided it)."""
    projects = []
    for name, processes in (("one", 1), ("two", 2)):
        params = copy.deepcopy(MICRO_PARAMS)
        params["dpo"]["train"]["batch_size"] = 8 // processes
        params["dpo"]["lora"] = {"r": 4, "alpha": 8, "merge_on_save": True}
        projects.append((fork(upstream, tmp_path / name, params), processes))
    for project, _ in projects:
        shutil.rmtree(project / "checkpoints")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda args: launch(args[0], ["dpo"], args[1]), projects))
    (one, _), (two, _) = projects
    a, b = weights(one / "outputs/dpo/adapter"), weights(two / "outputs/dpo/adapter")
    print(f"lora dpo, ddp: relative {relative_difference(a, b):.1e}, max abs {max_abs_difference(a, b):.1e}")
    assert relative_difference(a, b) < 1e-5
