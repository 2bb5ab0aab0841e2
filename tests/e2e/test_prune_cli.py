"""`moefold prune` end to end: train a tiny MoE, prune it from the CLI, then generate from,
export to Hugging Face and keep training the pruned checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moefold.checkpoint import load_checkpoint, resolve_checkpoint
from moefold.cli import main
from moefold.config import load_job
from moefold.generate import sample
from moefold.model.transformer import Transformer
from moefold.prune.apply import PruneSpec, prune_in_place
from moefold.prune.command import calibration_tokens
from moefold.prune.pack import pack
from tests.e2e.test_train import TINY as E2E_TINY

# The e2e tiny model (tests/e2e/test_train.py), with a gated shared expert and wider experts
# to prune; later --set items win. Steps and checkpoints are set per call.
TINY = [
    *E2E_TINY,
    "moe.ffn_hidden=48",
    "moe.shared_ffn_hidden=32",
    "moe.shared_gate=true",
    "train.eval_every=0",
]


def _train(tmp_path: Path, out: str, config: str, *extra: str) -> Path:
    sets = [f"data.cache_dir={tmp_path / 'cache'}", *extra]
    argv = ["train", "--config", config, "--out", str(tmp_path / out)]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0
    return resolve_checkpoint(tmp_path / out, "--checkpoint")


def _load(path: Path) -> Transformer:
    job = load_job(str(path / "config.toml"))
    model = Transformer(job.model, job.moe)
    load_checkpoint(path, model, None)
    return model.eval()


def _dead_units(model: Transformer) -> dict[str, torch.Tensor]:
    """Per MoE block, [E, F] True where a routed unit is zero in all three matrices."""
    dead = {}
    for name, block in model.layers.items():
        experts = block.mlp.experts
        live = experts.gate_proj.ne(0).any(1) | experts.up_proj.ne(0).any(1)
        dead[name] = ~(live | experts.down_proj.ne(0).any(2))
    return dead


@pytest.mark.slow
def test_prune_cli_end_to_end(tmp_path):
    trained = _train(tmp_path, "run", "tiny-moe", *TINY, "train.steps=3")
    out = tmp_path / "pruned"
    argv = ["prune", "--checkpoint", str(tmp_path / "run"), "--ratio", "0.5"]
    assert main([*argv, "--calib-tokens", "256", "--rho", "0.5", "--out", str(out)]) == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["method"] == "camera" and report["calibration_tokens"] == 256
    pruned_job = load_job(str(out / "config.toml"))
    assert pruned_job.moe.ffn_hidden == report["stored_ffn_hidden"] <= 48
    for widths in report["live_widths"].values():  # half of 4 * 48 + 32 units per layer
        assert sum(widths["routed"]) + widths["shared"] == 224 - 112
        assert max(widths["routed"]) <= pruned_job.moe.ffn_hidden
    params = report["expert_params"]  # 2 layers x units x 3 matrices x hidden 32
    assert params["before"] == 2 * 224 * 96 and params["live"] == 2 * 112 * 96
    assert params["live"] < params["stored"] <= params["before"]

    # The saved checkpoint is the in-memory pruning of the trained model.
    pruned = _load(out)
    reference = _load(trained)
    job = load_job(str(trained / "config.toml"))
    prune_in_place(reference, PruneSpec(ratio=0.5, rho=0.5), calibration_tokens(job, None, 256))
    reference = pack(reference)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = pruned(ids)
        torch.testing.assert_close(logits, reference(ids), rtol=0, atol=1e-6)
        assert not torch.allclose(logits, _load(trained)(ids), atol=1e-3)

    # Generates.
    text_ids = sample(pruned, [1, 2, 3], 5, 0.0, 0, torch.Generator(), 16)
    assert len(text_ids) == 8

    # Exports to HF exactly (zero columns pad the narrower experts).
    transformers = pytest.importorskip("transformers")
    assert main(["convert", "--to-hf", str(out), "--out", str(tmp_path / "hf")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, logits, rtol=0, atol=1e-5)

    # Trains: the dead units stay exactly zero, the live ones move.
    tuned = _train(
        tmp_path, "tuned", str(out / "config.toml"), f"checkpoint.init_from={out}", "train.steps=2"
    )
    before, after = _dead_units(pruned), _dead_units(_load(tuned))
    assert all(torch.equal(before[n], after[n]) and before[n].any() for n in before)
    moved = _load(tuned).layers["0"].mlp.experts.gate_proj
    assert not torch.equal(moved, pruned.layers["0"].mlp.experts.gate_proj)


def test_prune_cli_rejects_bad_arguments(tmp_path, capsys):
    argv = ["prune", "--checkpoint", str(tmp_path), "--ratio", "1.5", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "--ratio" in capsys.readouterr().err
    argv[4] = "0.5"
    assert main(argv) == 2
    assert "no intact checkpoint" in capsys.readouterr().err
