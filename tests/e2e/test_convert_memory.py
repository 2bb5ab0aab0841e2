"""`moefold convert --from-hf` streams (issue 29): the conversion never holds the model. A fresh
interpreter converts a 200 MB Mixtral-style HF folder while a thread samples its anonymous
resident memory (the safetensors files are memory-mapped: their pages are file-backed page
cache, which the kernel reclaims, and are reported apart). Gathering the model first, as the
conversion did before, grew anonymous memory by 218 MB here; streaming grows it by ~57 MB."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moefold.config import ModelConfig, MoEConfig
from moefold.interop import hf
from moefold.model.transformer import Transformer

CHILD = r"""
import json, sys, threading, time
from moefold.interop import hf

def resident():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

before = resident()
peak = dict(before)
done = threading.Event()

def sample():
    while not done.is_set():
        for key, value in resident().items():
            peak[key] = max(peak[key], value)
        time.sleep(0.002)

sampler = threading.Thread(target=sample)
sampler.start()
hf.import_checkpoint(sys.argv[1], sys.argv[2])
done.set()
sampler.join()
print(json.dumps({key: peak[key] - before[key] for key in before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_convert_from_hf_holds_a_fraction_of_the_model(tmp_path: Path):
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(hidden=256, layers=8, heads=4, kv_heads=2, ffn_hidden=512, vocab_size=1024),
        MoEConfig(num_experts=8, topk=2, ffn_hidden=1024),
    )
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hf.save(model, tmp_path / "hf")
    del model
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "hf"), str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    growth = json.loads(run.stdout.strip().splitlines()[-1])
    assert model_bytes > 200 * 2**20
    assert growth["RssAnon"] < 0.5 * model_bytes, (growth, model_bytes)
    # what it wrote is the folder's model, as the in-memory import reads it
    reference = hf.load(tmp_path / "hf").state_dict()
    for name, tensor in hf.checkpoint_tensors(tmp_path / "ck", list(reference)):
        assert torch.equal(tensor, reference[name]), name
