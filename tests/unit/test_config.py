"""Config: every field round-trips through `--set` and TOML, every rule names its field, the CLI
surface stays put, and docs/config.md matches scripts/gen_config_docs.py."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from moefold import config
from moefold.config import (
    ConfigError,
    JobConfig,
    check_job,
    job_from_dict,
    job_to_toml,
    load_job,
)

REPO = Path(__file__).resolve().parents[2]
PRESET = "tiny-moe"
SECTIONS = {f.name: typing.get_type_hints(JobConfig)[f.name] for f in dataclasses.fields(JobConfig)}
ALL_FIELDS = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


class Case(NamedTuple):
    """A legal non-default `--set` value for one field and what it must parse to."""

    value: str  # the text after `=`
    expected: Any  # the parsed field value
    also: tuple[str, ...] = ()  # further overrides the value needs to be legal
    world_size: int = 1  # a world size check_job accepts with this value


# The smallest multi-head latent attention on the preset (tiny-moe: 4 heads, kv_heads 2).
MLA = ("model.kv_lora_rank=8", "model.qk_rope_head_dim=4", "model.v_head_dim=8", "model.kv_heads=4")
# One entry per field of every section; a new field fails test_test_values_cover_every_field
# until it gets a legal test value here.
TEST_VALUES = {
    "model.hidden": Case("256", 256),
    "model.layers": Case("2", 2),
    "model.heads": Case("8", 8),
    "model.kv_heads": Case("1", 1),
    "model.ffn_hidden": Case("384", 384),
    "model.vocab_size": Case("1000", 1000),
    "model.head_dim": Case("16", 16),
    "model.rope_theta": Case("500000", 500000.0),
    "model.norm_eps": Case("1e-6", 1e-6),
    "model.tie_embeddings": Case("true", True),
    "model.qk_norm": Case("yes", True),
    "model.attn_bias": Case("1", True),
    "model.init_std": Case("0.01", 0.01),
    "model.kv_lora_rank": Case("8", 8, also=MLA[1:]),
    "model.q_lora_rank": Case("16", 16, also=MLA),
    "model.qk_nope_head_dim": Case("8", 8, also=MLA),
    "model.qk_rope_head_dim": Case("4", 4, also=MLA),
    "model.v_head_dim": Case("8", 8, also=MLA),
    "model.yarn_factor": Case("4", 4.0),
    "model.yarn_original_max_positions": Case("64", 64),
    "model.yarn_beta_fast": Case("16", 16.0),
    "model.yarn_beta_slow": Case("2", 2.0),
    "model.yarn_mscale": Case("0.707", 0.707),
    "model.yarn_mscale_all_dim": Case("1", 1.0),
    "model.mtp_depths": Case("2", 2),
    "moe.num_experts": Case("16", 16),
    "moe.topk": Case("1", 1, also=("moe.pre_softmax=true",)),
    "moe.ffn_hidden": Case("128", 128),
    "moe.first_dense_layers": Case("1", 1),
    "moe.layer_freq": Case("2", 2),
    "moe.score": Case("sigmoid", "sigmoid"),
    "moe.pre_softmax": Case("true", True),
    "moe.norm_topk_prob": Case("true", True),
    "moe.scaling_factor": Case("2.5", 2.5),
    "moe.num_groups": Case("4", 4, also=("moe.group_topk=2",)),
    "moe.group_score_topk": Case("2", 2, also=("moe.num_groups=4", "moe.group_topk=2")),
    "moe.group_topk": Case("1", 1, also=("moe.num_groups=2",)),
    "moe.aux_loss": Case("seq_aux", "seq_aux"),
    "moe.aux_loss_coeff": Case("0.001", 0.001),
    "moe.z_loss_coeff": Case("0.01", 0.01),
    "moe.expert_bias": Case("true", True),
    "moe.expert_bias_rate": Case("1e-4", 1e-4),
    "moe.router_dtype": Case("fp64", "fp64"),
    "moe.input_jitter": Case("0.01", 0.01),
    "moe.capacity_factor": Case("1.5", 1.5),
    "moe.pad_to_capacity": Case("true", True, also=("moe.capacity_factor=1.0",)),
    "moe.drop_policy": Case("position", "position"),
    "moe.dispatcher": Case("allgather", "allgather"),
    "moe.dedup": Case("true", True),
    "moe.shared_ffn_hidden": Case("128", 128),
    "moe.shared_gate": Case("true", True, also=("moe.shared_ffn_hidden=64",)),
    "moe.grouped_gemm": Case("off", "off"),
    "parallel.tp": Case("2", 2, world_size=2),
    "parallel.cp": Case("2", 2, world_size=2),
    "parallel.pp": Case("2", 2, world_size=2),
    "parallel.vpp": Case(
        "2", 2, also=("parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"), world_size=2
    ),
    "parallel.ep": Case("2", 2, world_size=2),
    "parallel.etp": Case("2", 2, world_size=2),
    "parallel.pp_schedule": Case("gpipe", "gpipe"),
    "parallel.pp_first_stage_layers": Case(
        "1", 1, also=("parallel.pp=2", "parallel.pp_last_stage_layers=3"), world_size=2
    ),
    "parallel.pp_last_stage_layers": Case(
        "3", 3, also=("parallel.pp=2", "parallel.pp_first_stage_layers=1"), world_size=2
    ),
    "parallel.distributed_optimizer": Case("true", True),
    "parallel.overlap_grad_reduce": Case("true", True),
    "parallel.grad_bucket_mb": Case("0.5", 0.5),
    "parallel.timeout_s": Case("30", 30.0),
    "parallel.heartbeat_s": Case("0", 0.0),
    "parallel.grad_compression": Case("bytegrad", "bytegrad"),
    "parallel.grad_compression_hierarchical": Case(
        "true",
        True,
        also=("parallel.grad_compression=bytegrad", "parallel.grad_compression_node_size=2"),
        world_size=4,
    ),
    "parallel.grad_compression_node_size": Case("8", 8),
    "train.steps": Case("7", 7),
    "train.nonfinite": Case("stop", "stop"),
    "train.max_skipped_steps": Case("3", 3),
    "train.recompute": Case("moe", "moe"),
    "train.mtp_loss_coeff": Case("0.3", 0.3),
    "train.bf16_gemm": Case("native", "native"),
    "train.keep_host_memory": Case("false", False),
    "train.global_batch": Case("32", 32),
    "train.micro_batch": Case("2", 2),
    "train.seq_len": Case("64", 64),
    "train.lr": Case("1e-3", 1e-3),
    "train.min_lr_ratio": Case("0.05", 0.05),
    "train.warmup_steps": Case("3", 3),
    "train.weight_decay": Case("0.05", 0.05),
    "train.beta1": Case("0.8", 0.8),
    "train.beta2": Case("0.99", 0.99),
    "train.eps": Case("1e-6", 1e-6),
    "train.grad_clip": Case("0.5", 0.5),
    "train.seed": Case("7", 7),
    "train.dtype": Case("bf16", "bf16"),
    "train.grad_reduce_dtype": Case("bf16", "bf16"),
    "train.eval_every": Case("5", 5),
    "train.eval_batches": Case("2", 2),
    "train.log_every": Case("10", 10),
    "train.peak_tflops": Case("1.5", 1.5),
    "train.wandb_project": Case("moefold-tests", "moefold-tests"),
    "data.source": Case("shakespeare", "shakespeare"),
    "data.path": Case("corpus/*.txt", "corpus/*.txt"),
    "data.token_dtype": Case("uint32", "uint32"),
    "data.val_every_nth": Case("5", 5),
    "data.cache_dir": Case("/tmp/moefold-cache", "/tmp/moefold-cache"),
    "data.tokenizer": Case("smollm2-ckpt/tokenizer", "smollm2-ckpt/tokenizer"),
    "checkpoint.every": Case("10", 10),
    "checkpoint.dir": Case("ckpt", "ckpt"),
    "checkpoint.keep": Case("3", 3),
    "checkpoint.resume": Case("none", "none"),
    "checkpoint.save_final": Case("false", False),
    "checkpoint.init_from": Case("runs/upcycled", "runs/upcycled"),
}


def _field(key: str) -> dataclasses.Field:
    section, name = key.split(".")
    return next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)


def _value(job: JobConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(job, section), name)


# ---- every field: --set, then TOML round trip ---------------------------------------------------


def test_test_values_cover_every_field():
    missing = sorted(set(ALL_FIELDS) - set(TEST_VALUES))
    stale = sorted(set(TEST_VALUES) - set(ALL_FIELDS))
    assert missing == [], f"add a legal non-default test value to TEST_VALUES for {missing}"
    assert stale == [], f"TEST_VALUES names fields that no longer exist: {stale}"


@pytest.mark.parametrize("key", ALL_FIELDS)
def test_every_field_set_round_trips_through_toml(key):
    assert key in TEST_VALUES, f"add a legal non-default test value to TEST_VALUES for {key}"
    case = TEST_VALUES[key]
    preset_value = _value(load_job(PRESET), key)
    assert case.expected != preset_value, f"{key}: the test value is the preset's value"
    assert case.expected != _field(key).default, f"{key}: the test value is the default"

    job = load_job(PRESET, [*case.also, f"{key}={case.value}"])
    check_job(job, case.world_size)
    value = _value(job, key)
    assert value == case.expected and type(value) is type(case.expected)

    reloaded = job_from_dict(tomllib.loads(job_to_toml(job)))
    assert reloaded == job


def test_later_set_wins_and_set_strips_spaces():
    job = load_job(PRESET, ["moe.topk=1", " moe.topk = 4 "])
    assert job.moe.topk == 4


def test_none_unsets_an_optional_field():
    job = load_job(PRESET, ["moe.capacity_factor=1.5", "moe.capacity_factor=none"])
    assert job.moe.capacity_factor is None
    assert "capacity_factor" not in tomllib.loads(job_to_toml(job))["moe"]


def test_every_preset_loads_and_round_trips():
    for name in config.preset_names():
        job = load_job(name)
        assert job_from_dict(tomllib.loads(job_to_toml(job))) == job, name


def test_sections_are_frozen():
    job = load_job(PRESET)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.moe.topk = 1  # type: ignore[misc]


# ---- validation: each rule raises ConfigError naming its field ----------------------------------

# (id, overrides on tiny-moe, world size for check_job, field the message starts with, fragment)
RULE_CASES = [
    ("topk-above-num-experts", ["moe.topk=9"], 1, "moe.topk", "moe.num_experts=8"),
    ("top1-without-pre-softmax", ["moe.topk=1"], 1, "moe.topk", "set moe.pre_softmax=true"),
    ("group-topk-without-num-groups", ["moe.group_topk=2"], 1, "moe.num_groups", "group_topk"),
    ("heads-not-divisible-by-kv-heads", ["model.kv_heads=3"], 1, "model.heads", "kv_heads=3"),
    (
        "pad-to-capacity-without-capacity-factor",
        ["moe.pad_to_capacity=true"],
        1,
        "moe.pad_to_capacity",
        "capacity_factor",
    ),
    (
        "dedup-with-allgather",
        ["moe.dedup=true", "moe.dispatcher=allgather"],
        1,
        "moe.dedup",
        "alltoall",
    ),
    ("grad-bucket-not-positive", ["parallel.grad_bucket_mb=0"], 1, "parallel.grad_bucket_mb", ">"),
    ("unknown-key", ["moe.topk_experts=2"], 1, "moe.topk_experts", "unknown field"),
    ("unknown-section", ["router.topk=2"], 1, "--set 'router.topk=2'", "unknown section"),
    ("set-without-field", ["moe=2"], 1, "--set 'moe=2'", "SECTION.FIELD=VALUE"),
    ("wrong-type-int", ["moe.topk=two"], 1, "moe.topk", "expected an integer"),
    ("wrong-type-float", ["train.lr=abc"], 1, "train.lr", "expected a number"),
    ("wrong-type-bool", ["model.tie_embeddings=maybe"], 1, "model.tie_embeddings", "true or false"),
    ("bad-literal", ["moe.score=relu"], 1, "moe.score", "softmax, sigmoid"),
    ("text-source-without-path", ["data.source=text"], 1, "data.path", "is required"),
    ("world-not-divisible-by-tp-cp-pp", ["parallel.tp=2"], 3, "parallel.tp", "tp*cp*pp=2"),
    ("world-not-divisible-by-ep-etp-pp", ["parallel.ep=2"], 3, "parallel.ep", "ep*etp*pp=2"),
    ("num-experts-not-divisible-by-ep", ["parallel.ep=3"], 3, "parallel.ep", "num_experts=8"),
    ("expert-ffn-not-divisible-by-etp", ["parallel.etp=3"], 3, "parallel.etp", "ffn_hidden=256"),
    (
        "grouped-gemm-on-with-unaligned-expert-shard",
        ["moe.grouped_gemm=on", "moe.ffn_hidden=24", "parallel.etp=2"],
        2,
        "moe.grouped_gemm",
        "moe.ffn_hidden/etp=12",
    ),
    ("heads-not-divisible-by-tp", ["parallel.tp=3"], 3, "parallel.tp", "model.heads=4"),
    (
        "seq-len-not-divisible-by-tp",
        ["parallel.tp=2", "train.seq_len=127"],
        2,
        "train.seq_len",
        "tp=2",
    ),
    (
        "global-batch-not-divisible-by-micro-batch-times-dp",
        ["train.global_batch=12"],
        2,
        "train.global_batch",
        "micro_batch*dp=4*2",
    ),
    ("eval-batches-not-divisible-by-dp", ["train.eval_batches=3"], 2, "train.eval_batches", "dp=2"),
    (
        "layers-not-divisible-by-pp",
        ["model.layers=3", "parallel.pp=2"],
        2,
        "model.layers",
        "pp*vpp=2",
    ),
    (
        "layers-not-divisible-by-pp-times-vpp",
        ["parallel.pp=2", "parallel.vpp=4", "parallel.pp_schedule=interleaved_1f1b"],
        2,
        "model.layers",
        "pp*vpp=8",
    ),
    (
        "vpp-without-interleaved-schedule",  # the default ('auto') picks interleaved_1f1b
        ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=1f1b"],
        2,
        "parallel.vpp",
        "interleaved_1f1b",
    ),
    (
        "ep-on-dense-model",
        ["moe.num_experts=0", "parallel.ep=2"],
        2,
        "parallel.ep",
        "needs MoE layers",
    ),
    (
        "etp-on-dense-model",
        ["moe.num_experts=0", "parallel.etp=2"],
        2,
        "parallel.ep",
        "needs MoE layers",
    ),
    (
        "first-dense-layers-above-layers",
        ["moe.first_dense_layers=5"],
        1,
        "moe.first_dense_layers",
        "model.layers=4",
    ),
    (
        "moe-recompute-on-dense-model",
        ["moe.num_experts=0", "train.recompute=moe_act"],
        1,
        "train.recompute",
        "'full' or 'none'",
    ),
    ("world-size-zero", [], 0, "world_size", ">= 1"),
]


@pytest.mark.parametrize(
    "overrides, world_size, field, fragment",
    [case[1:] for case in RULE_CASES],
    ids=[case[0] for case in RULE_CASES],
)
def test_rule_raises_config_error_naming_the_field(overrides, world_size, field, fragment):
    with pytest.raises(ConfigError) as error:
        check_job(load_job(PRESET, overrides), world_size)
    message = str(error.value)
    assert message.startswith(f"{field}: ") and fragment in message, message


def test_negative_adam_eps_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^train\.eps: "):
        load_job(PRESET, ["train.eps=-1e-8"])


@pytest.mark.parametrize(
    "section, values, field",
    [
        ("moe", {"topk": 2.0}, "moe.topk"),
        ("train", {"lr": True}, "train.lr"),
        ("model", {"tie_embeddings": 1}, "model.tie_embeddings"),
        ("moe", {"score": 1}, "moe.score"),
        ("data", {"path": 3}, "data.path"),
    ],
    ids=["float-for-int", "bool-for-float", "int-for-bool", "int-for-choice", "int-for-str"],
)
def test_toml_values_are_type_checked(section, values, field):
    raw = tomllib.loads((REPO / "moefold" / "configs" / f"{PRESET}.toml").read_text())
    raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=f"^{re.escape(field)}: "):
        job_from_dict(raw)


def test_unknown_and_missing_sections_in_toml():
    raw = tomllib.loads((REPO / "moefold" / "configs" / f"{PRESET}.toml").read_text())
    with pytest.raises(ConfigError, match=r"^router: unknown section"):
        job_from_dict({**raw, "router": {}})
    with pytest.raises(ConfigError, match=r"^model: the \[model\] section is required"):
        job_from_dict({k: v for k, v in raw.items() if k != "model"})
    del raw["model"]["hidden"]
    with pytest.raises(ConfigError, match=r"^model\.hidden: required"):
        job_from_dict(raw)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match=r"^--config: unknown preset 'tiny-moee'.*tiny-moe"):
        load_job("tiny-moee")


# ---- CLI surface --------------------------------------------------------------------------------


def _moefold(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moefold", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def test_train_help_lists_the_frozen_options(tmp_path):
    result = _moefold("train", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    options = set(re.findall(r"(--[a-z][a-z-]*)", result.stdout))
    assert {"--config", "--set", "--out", "--nproc"} <= options, result.stdout


@pytest.mark.parametrize(
    "args, field",
    [
        (["--set", "moe.topk=two"], "moe.topk"),
        (["--set", "parallel.tp=2", "--nproc", "3"], "parallel.tp"),
    ],
    ids=["bad-set-value", "check-job-rule"],
)
def test_bad_config_exits_2_before_creating_out(tmp_path, args, field):
    out = tmp_path / "run"
    result = _moefold("train", "--config", PRESET, *args, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"config error: {field}: " in result.stderr
    assert list(tmp_path.iterdir()) == []


# ---- docs/config.md -----------------------------------------------------------------------------


def _docs_script():
    path = REPO / "scripts" / "gen_config_docs.py"
    spec = importlib.util.spec_from_file_location("gen_config_docs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_config_md_is_up_to_date():
    expected = _docs_script().render()
    actual = (REPO / "docs" / "config.md").read_text()
    assert actual == expected, (
        "docs/config.md is stale: run python scripts/gen_config_docs.py > docs/config.md"
    )
    assert actual.isascii()


def test_docs_rules_list_check_job_rules_in_order():
    tree = ast.parse(inspect.getsource(check_job))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "_require"
    ]
    calls.sort(key=lambda node: (node.lineno, node.col_offset))
    fields = [node.args[1].value for node in calls]
    documented = [field for field, _ in _docs_script().RULES]
    assert documented == fields, "update RULES in scripts/gen_config_docs.py to match check_job"
