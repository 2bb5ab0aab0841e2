"""Help texts: bench usage lines name `moefold bench <suite>`, descriptions are whole
paragraphs, defaults are shown; bench moe-layer skips peers whose package is missing."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from moefold.bench import moe_layer

SUITES = {
    "moe-layer": "moefold.bench.moe_layer",
    "dispatch": "moefold.bench.dispatch",
    "train": "moefold.bench.train",
    "pipeline-bubble": "moefold.bench.pipeline_bubble",
}


@pytest.mark.parametrize("suite", list(SUITES))
def test_bench_help_names_the_command_shows_defaults_and_whole_description(suite, capsys):
    module = importlib.import_module(SUITES[suite])
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith(f"usage: moefold bench {suite} ")
    assert "python -m" not in text and "python -m" not in module.__doc__
    assert "(default: " in text
    first_paragraph = module.__doc__.strip().split("\n\n")[0]
    last_word = first_paragraph.split()[-1]
    assert last_word in " ".join(text.split())  # the description is not cut after one line


def test_train_and_generate_help_show_defaults(capsys):
    from moefold.cli import main

    for command in ("train", "generate", "report"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "(default: " in capsys.readouterr().out, command


def test_moe_layer_skips_missing_peers_and_says_so(monkeypatch, capsys):
    real = importlib.util.find_spec
    missing = {"transformers", "deepspeed", "torchtitan"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    args = moe_layer.build_parser().parse_args(["--tokens", "64", "--hidden", "32", "--ffn", "64"])
    workload = moe_layer.Workload(batch=1, seq=64, hidden=32, ffn_hidden=64, num_experts=8, topk=2)
    section = moe_layer.Section("fp32", "full", workload, with_peers=True)
    names = [row.name for row in moe_layer.candidates(args, section)]
    assert names[0] == "dense" and not any(
        n.startswith(("hf-", "deepspeed", "torch")) for n in names
    )
    err = capsys.readouterr().err
    assert "skipped hf-mixtral, hf-qwen3-moe: transformers is not installed" in err
    assert "skipped deepspeed: deepspeed is not installed" in err
