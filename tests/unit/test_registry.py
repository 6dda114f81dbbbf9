"""The stage registry is the one declaration: dvc.yaml, the CLI, the paths, the config sections, the
default pipeline, the launchable stages and evaluate's models follow from it, and no stage runs code that
DVC does not list as its dependency."""

import importlib
import modulefinder
import subprocess
import sys

import pytest
from ruamel.yaml import YAML

from alignment import registry
from alignment.paths import Paths
from alignment.registry import SECTIONS
from alignment.training import checkpoint
from flows import dvc_yaml
from flows.config import PipelineConfig
from tests.conftest import MICRO_PARAMS, ROOT


def test_committed_dvc_yaml_is_generated_from_the_registry():
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml.dvc_yaml(), "run `python -m alignment dvc-yaml`"
    done = subprocess.run(
        [sys.executable, "-m", "alignment", "dvc-yaml", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def imported_package_files(module: str) -> set[str]:
    """What `module` imports from the package, found by the standard library's bytecode scanner (an
    implementation independent of the registry's AST reader), transitively."""
    # the package only (other imports stay unresolved); MLflow plumbing is not followed (NOT_OUTPUT_CODE)
    excluded = [
        f.removesuffix(".py").replace("/", ".")
        for f in dvc_yaml.NOT_OUTPUT_CODE
        if not f.endswith("__init__.py")
    ]
    finder = modulefinder.ModuleFinder(path=[str(ROOT)], excludes=excluded)
    finder.run_script(str(ROOT / (module.replace(".", "/") + ".py")))
    files = set()
    for name, found in finder.modules.items():
        if (name == "__main__" or name.startswith("alignment")) and found.__file__:
            path = found.__file__
            if path.startswith(str(ROOT / "alignment")):
                files.add(str(path)[len(str(ROOT)) + 1 :])
    return files


@pytest.mark.parametrize("name", list(registry.STAGES))
def test_every_module_a_stage_runs_is_a_dvc_dependency(name):
    stages = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    entry = stages[name].get("do", stages[name])
    found = imported_package_files(registry.STAGES[name].module)
    expected = {f for f in found - set(dvc_yaml.NOT_OUTPUT_CODE) if not f.endswith("__init__.py")}
    missing = sorted(expected - set(entry["deps"]))
    assert not missing, f"{name} runs {missing} but dvc.yaml does not list them"
    assert f"alignment/stages/{name}.py" in entry["deps"]


def test_stages_never_import_other_stages():
    stage_files = {f"alignment/stages/{name}.py" for name in registry.STAGES}
    for name, stage in registry.STAGES.items():
        others = [
            d
            for d in dvc_yaml.code_deps(stage.module)
            if d in stage_files and d != f"alignment/stages/{name}.py"
        ]
        assert not others, f"{name} imports {others}: move what they share down a floor"


def test_registry_agrees_with_config_paths_and_cli():
    for name, stage in registry.STAGES.items():
        assert stage.params_section in SECTIONS and stage.params_section in MICRO_PARAMS
        assert callable(importlib.import_module(stage.module).run)
        assert Paths().out(name).as_posix() == stage.output.replace("${key}", "None")
    assert (
        Paths().rest(2).as_posix() == "outputs/rest/2"
        and Paths().metrics("rest_iter@2").as_posix() == "metrics/rest_iter_2.json"
    )
    assert Paths().sft.as_posix() == "outputs/sft" and Paths().rest_best.as_posix() == "outputs/rest_best"
    stages = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(registry.STAGES)
    assert stages["rest_iter"]["do"]["cmd"] == "python -m alignment rest_iter --iteration ${key}"


def test_fingerprint_follows_settings_inputs_and_world_size(tmp_path):
    from flows.config import parse

    cfg = parse("sft", MICRO_PARAMS["sft"])
    (tmp_path / "outputs" / "data").mkdir(parents=True)
    (tmp_path / "outputs" / "data" / "a.jsonl").write_text("1\n")
    first = checkpoint.fingerprint("sft", cfg, tmp_path)
    assert checkpoint.fingerprint("sft", cfg, tmp_path) == first
    resumed_off = parse(
        "sft", MICRO_PARAMS["sft"] | {"train": MICRO_PARAMS["sft"]["train"] | {"resume": False}}
    )
    assert (
        checkpoint.fingerprint("sft", resumed_off, tmp_path) == first
    )  # `resume` is not a setting of the result
    assert checkpoint.fingerprint("sft", cfg, tmp_path, world_size=2) != first
    (tmp_path / "outputs" / "data" / "a.jsonl").write_text("2\n")
    assert checkpoint.fingerprint("sft", cfg, tmp_path) != first


def test_launch_section_starts_the_stage_commands_it_names(tmp_path):
    """`launch.stages.<stage>` turns the stage's dvc.yaml cmd into a torchrun or accelerate launch; the
    stages it does not name stay `python -m alignment`."""
    from flows.config import parse

    launch = parse(
        "launch",
        {
            "stages": {
                "sft": {"launcher": "torchrun", "processes": 2},
                "dpo": {"launcher": "accelerate", "config_file": "configs/accelerate/multi_gpu.yaml"},
                "ppo": {"launcher": "torchrun", "processes": 8, "sharding": "fsdp2", "timeout_minutes": 60},
            }
        },
    )
    stages = YAML(typ="safe").load(dvc_yaml.dvc_yaml(launch=launch))["stages"]
    assert stages["sft"]["cmd"] == "torchrun --standalone --nproc_per_node 2 -m alignment sft"
    assert stages["dpo"]["cmd"] == (
        "accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m alignment dpo"
    )
    assert stages["rm"]["cmd"] == "python -m alignment rm"
    assert stages["ppo"]["cmd"] == (
        "env ALIGNMENT_SHARDING=fsdp2 ALIGNMENT_PROCESS_GROUP_TIMEOUT_MINUTES=60 "
        "torchrun --standalone --nproc_per_node 8 -m alignment ppo"
    )
    assert stages["rest_iter"]["do"]["cmd"] == "python -m alignment rest_iter --iteration ${key}"
    profile = YAML(typ="safe").load(dvc_yaml.dvc_yaml(["sft", "dpo"], "../..", launch))["stages"]
    assert profile["dpo"]["cmd"].startswith("accelerate launch --config_file ../../configs/accelerate/")


@pytest.mark.parametrize(
    "stages, message",
    [
        (
            {"gold": {"launcher": "torchrun", "processes": 2}},
            "stages.gold: runs as one process",
        ),
        ({"sftt": {"launcher": "python"}}, "not a stage"),
        ({"sft": {"launcher": "accelerate"}}, "needs a config_file"),
        ({"sft": {"launcher": "python", "processes": 2}}, "processes applies to launcher torchrun"),
        ({"sft": {"launcher": "python", "sharding": "fsdp2"}}, "sharding applies to launcher torchrun"),
        ({"sft": {"launcher": "python", "timeout_minutes": 5}}, "timeout_minutes applies to several"),
        (
            {"sft": {"launcher": "accelerate", "config_file": "configs/accelerate/deepspeed_zero3.yaml"}},
            "DeepSpeed is not supported",
        ),
        ({"sft": {"launcher": "torchrun", "sharding": "zero3"}}, "sharding: Input should be"),
    ],
)
def test_launch_section_refuses_what_cannot_run(stages, message):
    from alignment.config import ConfigError
    from flows.config import parse

    with pytest.raises(ConfigError, match=message):
        parse("launch", {"stages": stages})


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "fsdp2"])
def test_shipped_accelerate_configs_load(name):
    """Each file under configs/accelerate/ is a config `accelerate launch --config_file` reads."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.use_cpu is False


def test_the_lists_that_follow_from_the_registry():
    """The default pipeline, the launchable stages, evaluate's inputs and leaderboard, and the params
    sections are read from the stages' declarations, not kept beside them."""
    assert PipelineConfig().stages == tuple(n for n, s in registry.STAGES.items() if s.pipeline)
    assert "rlaif" not in PipelineConfig().stages and "simpo" in PipelineConfig().stages
    policies = [n for n, s in registry.STAGES.items() if s.policy]
    assert policies == list(registry.POLICY_STAGES) and {"dpo", "simpo", "ppo", "grpo", "rloo"} <= set(
        policies
    )
    assert set(policies) <= set(registry.STAGES["evaluate"].reads)
    assert list(registry.leaderboard_models()) == ["sft", *policies]
    assert registry.leaderboard_models()["rest"] == "outputs/rest_best"
    assert set(SECTIONS) == {s.params_section for s in registry.STAGES.values()} | {"tracking"}
    assert set(SECTIONS) - {"tracking"} <= set(MICRO_PARAMS)  # every stage has micro params


def test_flow_settings_are_no_stage_dependency():
    """A work-pool, launch or sweep setting is not in any stage's params or code deps: it re-runs nothing."""
    stages = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, entry in stages.items():
        entry = entry.get("do", entry)
        assert not any(dep.startswith("flows/") for dep in entry["deps"]), name
        assert set(entry["params"]) <= set(SECTIONS) - {"tracking"}, name


def test_a_launch_the_project_cannot_run_fails_before_any_stage(tmp_path, micro_params):
    """LoRA (or PPO's value head on the policy) under FSDP2 is refused when the params are validated, naming
    the stage and what to launch instead; the same stage with DDP is fine."""
    from alignment.config import ConfigError
    from flows.config import load_all
    from tests.conftest import write_params

    micro_params["dpo"]["lora"] = {"r": 4, "merge_on_save": True}
    micro_params["launch"] = {
        "stages": {"dpo": {"launcher": "torchrun", "processes": 2, "sharding": "fsdp2"}}
    }
    write_params(tmp_path / "params.yaml", micro_params)
    with pytest.raises(
        ConfigError, match="launch.stages.dpo: dpo: a LoRA adapter under FSDP2 is not supported"
    ):
        load_all(tmp_path / "params.yaml")
    micro_params["launch"]["stages"]["dpo"].pop("sharding")
    write_params(tmp_path / "params.yaml", micro_params)
    assert load_all(tmp_path / "params.yaml")["launch"].stages["dpo"].sharding == "none"
    micro_params["ppo"]["critic_init"] = "policy_head"
    micro_params["launch"] = {
        "stages": {"ppo": {"launcher": "torchrun", "processes": 2, "sharding": "fsdp2"}}
    }
    write_params(tmp_path / "params.yaml", micro_params)
    with pytest.raises(ConfigError, match="critic_init policy_head under FSDP2 is not supported"):
        load_all(tmp_path / "params.yaml")
