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
    ("parallel.ep", "dense model (moe.num_experts = 0): ep = etp = 1"),
    ("parallel.tp", "tp divides model.heads and model.kv_heads"),
    ("parallel.tp", "tp divides model.ffn_hidden"),
    ("train.seq_len", "divisible by tp, and by tp*2*cp when cp > 1 (causal cp split)"),
    ("train.global_batch", "divisible by micro_batch*dp"),
    ("train.eval_batches", "a multiple of dp"),
    ("parallel.pp_first_stage_layers", "uneven split: pp*vpp > 1 and first and last >= 1"),
    (
        "parallel.pp_last_stage_layers",
        "uneven split: the middle layers divide into the middle stages",
    ),
    ("model.layers", "even split: divisible by pp*vpp (layers per virtual pipeline stage)"),
    ("parallel.vpp", "vpp > 1 needs parallel.pp_schedule = 'interleaved_1f1b'"),
    ("parallel.vpp", "vpp > 1 needs pp > 1"),
    ("model.tie_embeddings", "not with pp > 1 (embedding and LM head sit on different stages)"),
    ("train.recompute", "`moe_act` and `moe` need MoE layers (moe.num_experts > 0)"),
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
moefold train --config tiny-moe --set moe.topk=1 --set parallel.ep=2 --nproc 2
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


def render() -> str:
    hints = typing.get_type_hints(config.JobConfig)
    sections = [section_table(f.name, hints[f.name]) for f in dataclasses.fields(config.JobConfig)]
    return "\n".join([INTRO, presets(), SET_SYNTAX, rules(), *sections])


if __name__ == "__main__":
    print(render(), end="")
