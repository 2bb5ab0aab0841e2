"""Print docs/config.md from moefold/config.py: presets, `--set`, cross-section rules, field tables.

    python scripts/gen_config_docs.py > docs/config.md

The field tables come from the dataclasses: names, types and defaults from `dataclasses.fields`,
descriptions from each field's trailing `# comment` in the source. tests/unit/test_config.py
fails when docs/config.md differs from this script's output, and when RULES below no longer
lists check_job's rules in order.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import tokenize
import types
import typing
from importlib import resources
from typing import Any, Literal

from moefold import config

# check_job's rules in source order: (field named in the error, the rule in words).
RULES = [
    ("world_size", "at least 1"),
    ("parallel.tp", "the world size is divisible by tp*cp*pp (dp = world_size / (tp*cp*pp))"),
    ("parallel.ep", "the world size is divisible by ep*etp*pp (edp = world_size / (ep*etp*pp))"),
    ("parallel.ep", "MoE model: moe.num_experts is divisible by ep"),
    ("parallel.etp", "MoE model: moe.ffn_hidden is divisible by etp"),
    (
        "moe.grouped_gemm",
        "MoE model, `on`: model.hidden and moe.ffn_hidden / etp are multiples of 8 "
        "(grouped_mm's 16-byte rows)",
    ),
    ("moe.first_dense_layers", "MoE model: at most model.layers"),
    (
        "moe.topk",
        "MoE model, topk = 1: pre_softmax (or sigmoid) and no norm_topk_prob, else every "
        "probability is 1.0 and the router gets no gradient (Megatron-Core refuses it too)",
    ),
    ("parallel.ep", "dense model (moe.num_experts = 0): ep = etp = 1"),
    ("parallel.tp", "tp divides model.heads and model.kv_heads"),
    ("parallel.tp", "tp divides model.ffn_hidden"),
    ("train.seq_len", "divisible by tp, and by tp*2*cp when cp > 1 (causal cp split)"),
    ("train.global_batch", "divisible by micro_batch*dp"),
    ("train.eval_batches", "a multiple of dp (0 = auto: 4 rounded up to a multiple of dp)"),
    ("parallel.pp_first_stage_layers", "uneven split: pp*vpp > 1 and first and last >= 1"),
    (
        "parallel.pp_last_stage_layers",
        "uneven split: the middle layers divide into the middle stages",
    ),
    ("model.layers", "even split: divisible by pp*vpp (layers per virtual pipeline stage)"),
    ("parallel.vpp", "vpp > 1 needs parallel.pp_schedule = 'interleaved_1f1b' (what 'auto' picks)"),
    ("parallel.vpp", "vpp > 1 needs pp > 1"),
    ("model.tie_embeddings", "not with pp > 1 (embedding and LM head sit on different stages)"),
    ("train.recompute", "`moe_act` and `moe` need MoE layers (moe.num_experts > 0)"),
    (
        "parallel.grad_compression_node_size",
        "with grad_compression_hierarchical: divides the world size (ranks per node)",
    ),
]

INTRO = """\
# Config

A job is one `JobConfig` (`moefold/config.py`): six frozen dataclasses, one per TOML section.
A preset gives the starting values, `--set` changes single fields, and every value is checked
against its field's type and rules before any process group starts. A mistake is a
`ConfigError` (a `ValueError`) whose message starts with the field name and says the fix; the
CLI prints it and exits with code 2. Each run folder gets the fully resolved `config.toml`,
which `--config runs/NAME/config.toml` loads again.

This file is generated from `moefold/config.py` by `scripts/gen_config_docs.py`; to change a
description, edit the field's comment there and run
`python scripts/gen_config_docs.py > docs/config.md` (a unit test fails when this file is stale).
"""

SET_SYNTAX = """\
## Overrides: `--set SECTION.FIELD=VALUE`

```
moefold train --config tiny-moe --set moe.topk=4 --set parallel.ep=2 --nproc 2
```

- Repeatable; applied in order on top of the preset, so the last one wins.
- The value is read by the field's type: integers, numbers (`3e-4`), booleans (`true`/`false`,
  `1`/`0`, `yes`/`no`), one of the listed choices, or a string taken as is (no quotes).
- `none` (or an empty value) unsets an optional field: `--set moe.capacity_factor=none`.
- An unknown section or field, a wrong type and a value outside the choices are errors.
"""

VALIDATION = """\
## Validation

Each section checks its own fields when it is built (positive sizes, `moe.topk <=
moe.num_experts`, `model.kv_heads` divides `model.heads`, `moe.pad_to_capacity` needs
`moe.capacity_factor`, ...). Rules that span sections live in
`check_job(job, world_size)`, one rule per line; `dp` and `edp` are never configured, they are
derived from the world size.
"""

MEGATRON = """\
## Routing and Megatron-Core

For every option the two share, moefold's router (`moefold/model/router.py`) and dispatchers
compute what Megatron-Core 0.16.1's `TopKRouter` and `moe_utils` compute: the same experts,
probabilities, capacity, kept slots, combined output, `aux` / `seq_aux` / `global_aux` and z-loss
values and gradients. `tests/parity/` runs Megatron's own functions on CPU against moefold on the
same inputs. Field names: `score` = `moe_router_score_function`, `pre_softmax` =
`moe_router_pre_softmax`, `scaling_factor` = `moe_router_topk_scaling_factor`, `num_groups` /
`group_topk` = `moe_router_num_groups` / `moe_router_group_topk`, `aux_loss` =
`moe_router_load_balancing_type` (`aux_loss`, `seq_aux_loss`, `global_aux_loss`),
`aux_loss_coeff` / `z_loss_coeff` = `moe_aux_loss_coeff` / `moe_z_loss_coeff`, `expert_bias` =
`moe_router_enable_expert_bias`, `capacity_factor` / `pad_to_capacity` / `drop_policy` =
`moe_expert_capacity_factor` / `moe_pad_expert_input_to_capacity` / `moe_token_drop_policy`,
`router_dtype` = `moe_router_dtype`, `input_jitter` = `moe_input_jitter_eps`. Each balancing
loss is `coeff * E / (K * T^2) * sum_e P_e * c_e` (P_e: summed probability of expert e, c_e:
its load on an unbiased, ungrouped top-k), so it equals `coeff` for a perfectly balanced router.
`moe.topk=1` needs `pre_softmax=true` (or sigmoid scores), as in Megatron.

Where moefold keeps a behaviour of its own, the parity suite asserts the difference:
"""

# (moefold, Megatron-Core 0.16.1, why moefold keeps its behaviour): rows of MEGATRON's table.
MEGATRON_DIFFERENCES = [
    (
        "`norm_topk_prob=true` renormalises pre-softmax top-k probabilities",
        "no such option (pre-softmax probabilities are never renormalised)",
        "Hugging Face `norm_topk_prob` models (Qwen2-MoE, DeepSeek-V2); without groups or bias "
        "it equals softmax after top-k",
    ),
    (
        "sigmoid scores renormalised only with `norm_topk_prob=true`",
        "sigmoid top-k always renormalised when K > 1",
        "Hugging Face sigmoid routers carry the flag; set it for Megatron's behaviour",
    ),
    (
        "`expert_bias=true` with softmax scores: the bias is added to the softmax probabilities "
        "for selection only",
        "refused (`moe_router_enable_expert_bias` needs sigmoid)",
        "aux-loss-free balancing for softmax routers",
    ),
    (
        "groups with `topk < group_topk`: a group scores its best expert",
        "a group scores the sum of its top `topk // group_topk` = 0 experts, so every group ties",
        "the best expert stays reachable",
    ),
    (
        "`router_dtype=fp64`: GEMM, softmax / sigmoid and losses in fp64, probabilities handed "
        "to the experts in fp32",
        "GEMM in fp64, softmax / sigmoid computed in fp32 and cast back (agree within 2e-6)",
        "the name promises fp64; Megatron's default `moe_router_dtype=None` routes in the "
        "activations' dtype (bf16 under bf16), moefold never below fp32",
    ),
    (
        "`input_jitter` only while training",
        "`apply_input_jitter` also jitters in evaluation",
        "deterministic evaluation and generation; the noise is the same draw ([S, B, D] order, "
        "torch's default generator)",
    ),
    (
        "`drop_policy=position` keeps each expert's earliest positions, position-major across "
        "the micro-batch's sequences ([S, B] order: the tail positions of every sequence drop)",
        "picks the kept tokens with `torch.topk` over the 0/1 routing map, whose choice among "
        "tied routed tokens is unspecified (on CPU not the earliest)",
        'Megatron\'s stated rule ("drop the tokens at the end"); capacity and per-expert counts '
        "agree",
    ),
    (
        "expert-bias load (and `step_tokens_per_expert`) counts the router's choice before "
        "capacity",
        "counts the routing map after dropping and padding (padded: `capacity` for every "
        "expert, so the bias never moves)",
        "the bias balances what the router asks for",
    ),
    (
        "`global_aux` at dp > 1: the load runs over micro-batches in global order "
        "(m = j * dp + dp_rank)",
        "at micro-step j, the load of all dp ranks' micro-batches 0..j",
        "every layout reproduces the single-process run; equal at dp = 1",
    ),
]


def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of every field of a dataclass, from its source."""
    source = inspect.getsource(cls)
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {
        t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT
    }
    class_node = ast.parse(source).body[0]
    assert isinstance(class_node, ast.ClassDef)
    out = {}
    for node in class_node.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            found = [comments[line] for line in lines if line in comments]
            if len(found) != 1:
                raise ValueError(
                    f"{cls.__name__}.{node.target.id}: needs exactly one trailing # comment, "
                    f"found {len(found)}"
                )
            out[node.target.id] = found[0]
    return out


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{choice}`" for choice in typing.get_args(annotation))
    if origin in (types.UnionType, typing.Union):
        names = [type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(names) + " or `none`"
    return annotation.__name__


def default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING:
        return "required"
    value = f.default
    if value is None:
        return "`none`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def section_table(section: str, cls: type) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()[0]
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = [
        f"## `[{section}]` ({cls.__name__})",
        "",
        doc,
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for f in dataclasses.fields(cls):
        cells = [f"`{section}.{f.name}`", type_name(hints[f.name]), default_text(f)]
        cells.append(comments[f.name])
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def preset_summary(name: str) -> str:
    """The first sentence of the preset's leading comment block."""
    text = (resources.files("moefold") / "configs" / f"{name}.toml").read_text()
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    summary = " ".join(lines)
    return re.split(r"(?<=\.)\s", summary, maxsplit=1)[0] if summary else ""


def presets() -> str:
    rows = [
        "## Presets: `--config NAME`",
        "",
        "`NAME` is a preset bundled in `moefold/configs/` or a path to a `.toml` file; the",
        "default is `tiny-moe`. A preset sets a subset of the fields below; the rest keep their",
        "defaults.",
        "",
        "| preset | what |",
        "|---|---|",
    ]
    rows += [f"| `{name}` | {preset_summary(name)} |" for name in config.preset_names()]
    return "\n".join(rows) + "\n"


def rules() -> str:
    rows = [
        VALIDATION,
        "| # | field in the error | rule |",
        "|---|---|---|",
    ]
    rows += [f"| {i} | `{field}` | {text} |" for i, (field, text) in enumerate(RULES, 1)]
    return "\n".join(rows) + "\n"


def megatron() -> str:
    rows = [MEGATRON, "| moefold | Megatron-Core 0.16.1 | why |", "|---|---|---|"]
    rows += [f"| {ours} | {theirs} | {why} |" for ours, theirs, why in MEGATRON_DIFFERENCES]
    return "\n".join(rows) + "\n"


def render() -> str:
    hints = typing.get_type_hints(config.JobConfig)
    sections = []
    for f in dataclasses.fields(config.JobConfig):
        sections.append(section_table(f.name, hints[f.name]))
        if f.name == "moe":
            sections.append(megatron())
    return "\n".join([INTRO, presets(), SET_SYNTAX, rules(), *sections])


if __name__ == "__main__":
    print(render(), end="")
