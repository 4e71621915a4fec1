"""The study-file validator: one clear line per problem, exit status 2, before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import fresh_python
from hypothesis import given, settings
from hypothesis import strategies as st

from peftbench import cli, config
from peftbench import methods as registry
from peftbench.errors import UserError

GOOD = {"model": "minilm", "data": {"path": "/nowhere"}, "methods": ["full", "lora"]}


def problems(raw) -> list[str]:
    with pytest.raises(UserError) as e:
        config.validate(raw)
    return e.value.problems


def test_valid_study_gets_defaults():
    s = config.validate({**GOOD, "methods": ["full", {"name": "lora", "r": 4, "epochs": 1}], "seeds": 3})
    assert s["seeds"] == [0, 1, 2]
    assert s["train"]["batch_size"] == 16 and s["train"]["learning_rate"] is None
    assert [m["name"] for m in s["methods"]] == ["full", "lora"]
    assert s["methods"][1]["options"] == {"r": 4, "epochs": 1}
    assert s["methods"][1]["label"] == "lora(epochs=1,r=4)"


def test_a_run_built_outside_a_study_gets_the_study_defaults():
    """A run spec made in code (the benchmarks, a notebook) behaves as a study's run unless told otherwise:
    the settings a study and `spec.Runtime` share have one default (the device aside: a study's "auto" is
    resolved before a run gets it)."""
    import dataclasses

    from peftbench.spec import Runtime

    shared = {f.name: f.default for f in dataclasses.fields(Runtime) if f.name in config.TOP_DEFAULTS}
    assert {"max_oom_retries", "checkpoint_every_seconds", "isolation", "tracking"} <= set(shared)
    assert {k: v for k, v in shared.items() if config.TOP_DEFAULTS[k] != v} == {"device": "cpu"}


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({**GOOD, "modle": "x"}, "modle: unknown key"),
        ({**GOOD, "train": {"epoch": 3}}, "train.epoch: unknown key (did you mean 'epochs'?)"),
        ({**GOOD, "train": {"epochs": "five"}}, "train.epochs: must be a positive integer"),
        ({**GOOD, "train": {"epochs": 0}}, "train.epochs: must be a positive integer"),
        ({**GOOD, "train": {"learning_rate": -1e-4}}, "train.learning_rate: must be a positive number"),
        (
            {**GOOD, "train": {"learning_rate": float("nan")}},
            "train.learning_rate: must be a positive number",
        ),
        ({**GOOD, "train": {"batch_size": 2.5}}, "train.batch_size: must be a positive integer"),
        ({**GOOD, "train": {"weight_decay": -0.1}}, "train.weight_decay: must be a number >= 0"),
        ({**GOOD, "train": {"warmup_ratio": 1.5}}, "train.warmup_ratio: must be a number in [0, 1)"),
        ({**GOOD, "train": {"scheduler": "wavy"}}, "train.scheduler: must be one of"),
        ({**GOOD, "train": {"cuda_graphs": "yes"}}, "train.cuda_graphs: must be true or false"),
        (
            {**GOOD, "train": {"compile": "layers"}},
            'train.compile: must be true, false, "cudagraphs" or "blocks"',
        ),
        ({**GOOD, "methods": ["lorra"]}, "unknown method 'lorra' (did you mean 'lora'?)"),
        ({**GOOD, "methods": [{"name": "lora", "rank": 8}]}, "methods[0].rank: unknown key"),
        ({**GOOD, "methods": [{"name": "lora", "r": 0}]}, "methods[0].r: must be a positive integer"),
        (
            {**GOOD, "methods": [{"name": "lora", "targets": ["q", "z"]}]},
            "methods[0].targets: must be a list of roles",
        ),
        ({**GOOD, "methods": []}, "methods: must be a non-empty list"),
        ({**GOOD, "methods": [42]}, "methods[0]: must be a method name"),
        ({**GOOD, "data": {"train_size": 10}}, "data: give `path`"),
        ({**GOOD, "data": {"path": "/x", "train_size": -5}}, "data.train_size: must be a positive integer"),
        ({**GOOD, "data": {"path": "/x", "text_column": 3}}, "data.text_column: must be a column name"),
        ({**GOOD, "data": {"path": "/x", "colour": 3}}, "data.colour: unknown key"),
        ({**GOOD, "seeds": [1, 1]}, "seeds: must be a positive count or a list of distinct integers"),
        ({**GOOD, "seeds": 0}, "seeds: must be a positive count"),
        ({**GOOD, "lr_search": {"points": 1}}, "lr_search.points: must be an integer >= 2"),
        ({**GOOD, "lr_search": {"schedule": "asha"}}, "lr_search.schedule: must be grid or halving"),
        ({**GOOD, "train": {"sharding": "zero3"}}, "train.sharding: must be none or fsdp"),
        (
            {**GOOD, "train": {"sharding": "fsdp"}},
            "train.sharding: fsdp shards a run over its GPUs; set gpus_per_run",
        ),
        (
            {
                **GOOD,
                "gpus_per_run": 2,
                "isolation": "process",
                "methods": ["qlora"],
                "train": {"sharding": "fsdp"},
            },
            "methods: qlora cannot run with train.sharding: fsdp here",
        ),
        (
            {
                **GOOD,
                "gpus_per_run": 2,
                "isolation": "process",
                "methods": ["adalora"],
                "train": {"sharding": "fsdp"},
            },
            "methods: adalora cannot run with train.sharding: fsdp here",
        ),
        (
            {
                **GOOD,
                "gpus_per_run": 2,
                "isolation": "process",
                "methods": ["lora", {"name": "full", "label": "full-bf16", "optimizer": "adamw_bf16"}],
                "train": {"sharding": "fsdp"},
            },
            "train.optimizer: adamw_bf16 is not built for train.sharding: fsdp (full-bf16); use adamw",
        ),
        (
            {
                **GOOD,
                "gpus_per_run": 2,
                "isolation": "process",
                "methods": ["lora"],
                "train": {"sharding": "fsdp", "optimizer": "adamw_bf16"},
            },
            "train.optimizer: adamw_bf16 is not built for train.sharding: fsdp (lora); use adamw",
        ),
        (
            {**GOOD, "lr_search": {"reduction_factor": 1}},
            "lr_search.reduction_factor: must be an integer >= 2",
        ),
        ({**GOOD, "lr_search": {"grace_epochs": 0}}, "lr_search.grace_epochs: must be a positive integer"),
        ({**GOOD, "device": "tpu"}, "device: must be auto, cpu, cuda"),
        ({**GOOD, "parallel": 0}, "parallel: must be a positive integer"),
        ({k: v for k, v in GOOD.items() if k != "model"}, "model: required"),
    ],
)
def test_each_problem_gets_a_clear_line(raw, expected):
    found = problems(raw)
    assert any(expected in p for p in found), found


def test_all_problems_reported_at_once():
    found = problems(
        {
            "model": "minilm",
            "data": {"path": "/x"},
            "methods": ["lorra"],
            "train": {"epochs": -1, "batch_size": 0},
        }
    )
    assert len(found) == 3


def test_not_a_mapping():
    assert "must be a YAML mapping" in problems(["a", "b"])[0]


def _cli(capsys, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


def test_cli_bad_study_exits_2_with_one_line_each(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(
        yaml.safe_dump(
            {"model": "minilm", "data": {"path": str(tmp_path)}, "methods": ["nope"], "train": {"epochs": 0}}
        )
    )
    code, err = _cli(capsys, ["run", str(f), "--out", str(tmp_path / "out")])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("peftbench: error: ") for line in lines)
    assert "Traceback" not in err


def test_cli_invalid_yaml(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("model: [unclosed\n")
    code, err = _cli(capsys, ["run", str(f)])
    assert code == 2 and "not valid YAML" in err


def test_cli_missing_study_file(tmp_path, capsys):
    code, err = _cli(capsys, ["run", str(tmp_path / "missing.yaml")])
    assert code == 2 and "not found" in err


def test_yaml_is_loaded_safely(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    code, err = _cli(capsys, ["run", str(f)])
    assert code == 2 and "not valid YAML" in err


def test_presets_are_valid():
    for name in config.preset_names():
        raw = config.load_preset(name)
        raw.setdefault("data", {})
        if not raw["data"].get("path") and not raw["data"].get("name"):
            raw["data"]["path"] = "/somewhere"
        s = config.validate(raw)
        assert s["methods"], name
    assert {"quick", "seed", "fair"} <= set(config.preset_names())


def test_seed_preset_is_the_starting_study():
    s = config.validate(config.load_preset("seed"))
    assert s["model"] == "roberta-base"
    assert s["train"]["learning_rate"] == 2e-5 and s["train"]["max_length"] == 512
    assert s["train"]["epochs"] == 5 and s["train"]["batch_size"] == 16 and s["train"]["weight_decay"] == 0.01
    lora = next(m for m in s["methods"] if m["name"] == "lora")
    assert lora["options"]["r"] == 16 and lora["options"]["epochs"] == 3
    assert lora["options"]["targets"] == ["q", "k", "v"]
    assert (s["data"]["train_size"], s["data"]["test_size"]) == (3000, 2000)
    assert s["train"]["base_dtype"] == "fp32"  # the published study held its frozen weights in fp32


def test_frozen_weights_are_bf16_on_a_gpu_unless_fp32_is_asked_for():
    """A GPU run holds a frozen base in the autocast dtype, as practitioners do; full fine-tuning's weights
    are its fp32 master copy (bf16 under `optimizer: adamw_bf16`); the CPU and `base_dtype: fp32` (the seed
    preset) keep fp32."""
    from types import SimpleNamespace

    import torch

    from peftbench.models import frozen_dtype

    def spec(method, base_dtype="auto", optimizer="adamw"):
        return SimpleNamespace(
            method=method, train=SimpleNamespace(base_dtype=base_dtype, optimizer=optimizer)
        )

    bf16 = torch.bfloat16
    assert frozen_dtype(spec("lora"), "cuda", bf16) == bf16
    assert frozen_dtype(spec("qlora"), "cuda:1", bf16) == bf16
    assert frozen_dtype(spec("full"), "cuda", bf16) == torch.float32
    assert frozen_dtype(spec("full", optimizer="adamw_bf16"), "cuda", bf16) == bf16
    assert frozen_dtype(spec("lora"), "cpu", bf16) == torch.float32
    assert frozen_dtype(spec("lora"), "cuda", None) == torch.float32
    seed = config.validate(config.load_preset("seed"))["train"]["base_dtype"]
    assert frozen_dtype(spec("lora", seed), "cuda", bf16) == torch.float32


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10_000), st.floats(allow_nan=True), st.text(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "model",
        "data",
        "methods",
        "train",
        "seeds",
        "lr_search",
        "device",
        "parallel",
        "name",
        "isolation",
        "report",
        "bogus",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=8))
def test_validator_fuzz_only_ever_raises_user_errors(raw):
    try:
        config.validate(raw)
    except UserError as e:
        assert e.problems and all(isinstance(p, str) and p and "\n" not in p for p in e.problems)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_yaml_text_fuzz(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("fuzz") / "s.yaml"
    f.write_text(text, encoding="utf-8")
    try:
        config.validate(config.load_yaml(f))
    except UserError:
        pass


def test_methods_flag_keeps_the_presets_settings_for_methods_it_names():
    from peftbench import cli

    args = cli.parser().parse_args(["run", "--preset", "seed", "--methods", "lora,dora", "--data", "x"])
    raw, _ = cli.build_study(args)
    lora, dora = raw["methods"]
    assert lora["r"] == 16 and lora["targets"] == ["q", "k", "v"] and lora["epochs"] == 3  # the seed's LoRA
    assert dora == "dora"  # not in the preset: registry defaults


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "studies").glob("*.yaml"))
)
def test_every_shipped_study_file_is_valid(name):
    from peftbench import config

    raw = config.load_yaml(Path(__file__).resolve().parents[1] / "studies" / name)
    config.validate({**raw, "data": {**raw["data"], "name": None, "path": "somewhere"}})


def test_registry_options_are_peft_fields_and_validation_needs_peft_only_for_others():
    """Option keys the registry itself uses pass without importing peft (5-18 s in the CLI's process); any
    other key is checked against the PEFT config class's real fields."""
    out = fresh_python(
        "from peftbench import config\nconfig.validate(config.load_preset('seed'))\n"
        "print('peft' in sys.modules)"
    )
    assert out.split()[-1] == "False", out
    for m in registry.METHODS.values():
        if m.kind == "peft":
            assert set(m.options) - registry.EXTRA_PEFT_KEYS <= registry.peft_config_fields(m), m.name
    raw = {**GOOD, "methods": [{"name": "lora", "use_dora": True}, {"name": "lora", "rank": 4}]}
    with pytest.raises(UserError) as e:
        config.validate(raw)
    assert "rank" in str(e.value) and "use_dora" not in str(e.value)


def test_compile_blocks_from_the_study_file_and_the_flag():
    assert config.validate({**GOOD, "train": {"compile": "blocks"}})["train"]["compile"] == "blocks"
    for flag, want in (("blocks", "blocks"), ("off", False), ("cudagraphs", "cudagraphs")):
        raw, _ = cli.build_study(cli.parser().parse_args(["run", "--preset", "quick", "--compile", flag]))
        assert config.validate(raw)["train"]["compile"] == want


def test_cuda_graphs_flag_sets_the_study_option():
    from peftbench import cli

    for flag, want in (("off", False), ("on", True)):
        raw, _ = cli.build_study(cli.parser().parse_args(["run", "--preset", "quick", "--cuda-graphs", flag]))
        assert config.validate(raw)["train"]["cuda_graphs"] is want
    raw, _ = cli.build_study(cli.parser().parse_args(["run", "--preset", "quick"]))
    assert config.validate(raw)["train"]["cuda_graphs"] is True  # the default


def test_every_option_has_help_with_an_example():
    import argparse

    from peftbench import cli

    parser = cli.parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and "e.g." in action.help, (name, action.dest)


def test_a_command_ends_without_the_collectors_last_passes():
    """Objects are frozen out of the garbage collector as the process ends (a study's command spent 0.9 s of
    its exit in the collector's last passes), and only then: the calling process keeps collecting."""
    import gc

    code = (
        "import atexit, gc; atexit.register(lambda: print('frozen at the end:', gc.get_freeze_count() > 0)); "
        "from peftbench import cli; cli.main(['methods']); print('not reached')"
    )
    out = fresh_python(code, timeout=120)
    assert out.splitlines()[-1] == "frozen at the end: True"
    with pytest.raises(SystemExit):
        cli.main(["methods"])
    assert gc.get_freeze_count() == 0
