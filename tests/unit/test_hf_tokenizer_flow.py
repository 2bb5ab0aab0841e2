"""The Hugging Face flow end to end: a converted model keeps its tokenizer, generate / text
sources / token files / export use it, generate's KV cache changes no token, and converted
and upcycled configs fine-tune under --nproc."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moefold.checkpoint import load_checkpoint
from moefold.cli import main
from moefold.config import DataConfig, JobConfig, ModelConfig, check_job, load_job
from moefold.data import build_datasets, load_tokenizer
from moefold.generate import sample
from moefold.interop import commands, hf
from moefold.model.transformer import Transformer
from moefold.model.upcycle import UpcycleSpec

transformers = pytest.importorskip("transformers")

TEXT = (
    "The state of the Union is strong. Congress shall make no law. "
    "We the people of the United States, in order to form a more perfect union. "
) * 20
VOCAB = 320


def _hf_tokenizer(folder: Path) -> None:
    """A small byte-level BPE with "</s>" as EOS, saved as transformers saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.save_pretrained(folder)


def _hf_llama(folder: Path):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.3)
    model.save_pretrained(folder)
    _hf_tokenizer(folder)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-flow")
    model = _hf_llama(root / "llama")
    assert main(["convert", "--from-hf", str(root / "llama"), "--out", str(root / "ckpt")]) == 0
    return root, model


def test_convert_from_hf_keeps_the_tokenizer_and_fine_tuning_defaults(converted):
    root, _ = converted
    ckpt = root / "ckpt"
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    job = load_job(str(ckpt / "config.toml"))
    assert Path(job.data.tokenizer) == (ckpt / "tokenizer").resolve()
    assert job.train.lr == 1e-4 and job.train.micro_batch == 1
    for world in (1, 2, 4, 8):
        check_job(job, world)  # runs under --nproc N as saved


def test_generate_decodes_with_the_models_tokenizer(converted, capsys):
    root, model = converted
    prompt = "The state of the Union"
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "llama")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(8):  # greedy with transformers' own model and tokenizer
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    argv = ["generate", "--checkpoint", str(root / "ckpt"), "--prompt", prompt]
    assert main([*argv, "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tokenizer.decode(ids)


def test_convert_to_hf_writes_a_tokenizer_autotokenizer_loads(converted):
    root, _ = converted
    out = root / "exported"
    assert main(["convert", "--to-hf", str(root / "ckpt"), "--out", str(out)]) == 0
    original = transformers.AutoTokenizer.from_pretrained(root / "llama")
    exported = transformers.AutoTokenizer.from_pretrained(out)
    assert exported("We the people")["input_ids"] == original("We the people")["input_ids"]
    assert exported.eos_token == "</s>"


def test_export_of_a_bpe_run_writes_its_tokenizer(tmp_path):
    """A run trained on a text source exports the BPE it trained, loadable by AutoTokenizer."""
    (tmp_path / "corpus").mkdir()
    for i in range(12):
        (tmp_path / "corpus" / f"doc{i}.txt").write_text(TEXT[i * 7 :])
    data = DataConfig(source="text", path=str(tmp_path / "corpus"), cache_dir=str(tmp_path / "c"))
    model_cfg = ModelConfig(hidden=16, layers=1, heads=2, kv_heads=1, ffn_hidden=32, vocab_size=300)
    job = JobConfig(model=model_cfg, data=data)
    model = Transformer(model_cfg, job.moe)
    hf.save_model_checkpoint(hf.model_tensors(model), job, tmp_path / "ckpt")
    hf.export_checkpoint(tmp_path / "ckpt", tmp_path / "out")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ours = load_tokenizer(data, model_cfg.vocab_size)
    assert exported("Congress shall")["input_ids"] == ours.encode("Congress shall")
    assert exported.decode(ours.encode(TEXT[:80])) == TEXT[:80]


def test_tokenize_and_text_sources_use_the_models_tokenizer(converted, tmp_path, capsys):
    root, _ = converted
    docs = ["We the people of the United States.", "Congress shall make no law."]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc)
    out = tmp_path / "tokens.npy"
    assert (
        main(["tokenize", "--tokenizer", str(root / "ckpt"), "--out", str(out), str(tmp_path)]) == 0
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "llama")
    eos = tokenizer.eos_token_id
    streams = [[eos, *tokenizer(doc, add_special_tokens=False)["input_ids"]] for doc in docs]
    expected = streams[0] + streams[1]
    assert np.load(out).tolist() == expected
    assert "data.source=tokens" in capsys.readouterr().out
    # a text source with data.tokenizer encodes with it (EOS between documents)
    data = DataConfig(
        source="text",
        path=str(tmp_path),
        val_every_nth=2,
        cache_dir=str(tmp_path / "cache"),
        tokenizer=str(root / "ckpt" / "tokenizer"),
    )
    train, val, used = build_datasets(data, VOCAB, 4, 0)
    assert used.eot_id == eos and used.pretrained
    # val_every_nth=2: document 0 trains, document 1 validates
    assert [train.tokens.tolist(), val.tokens.tolist()] == streams
    # and the token files decode with it
    tokens = DataConfig(source="tokens", path=str(out), tokenizer=data.tokenizer)
    assert load_tokenizer(tokens, VOCAB).decode(expected[1:9]) == tokenizer.decode(expected[1:9])


@pytest.mark.parametrize("max_context", [64, 12], ids=["fits", "window-slides"])
def test_kv_cache_gives_the_same_greedy_tokens(converted, max_context):
    root, _ = converted
    job = load_job(str(root / "ckpt" / "config.toml"))
    model = Transformer(job.model, job.moe)
    load_checkpoint(root / "ckpt", model, None)
    model.eval()
    prompt = [5, 17, 40, 41, 99]

    def run(kv_cache: bool) -> list[int]:
        generator = torch.Generator().manual_seed(0)
        return sample(model, prompt, 20, 0.0, 0, generator, max_context, kv_cache=kv_cache)

    cached, recomputed = run(True), run(False)
    assert cached == recomputed
    assert len(set(cached[len(prompt) :])) > 1  # a real sequence, not one repeated id


def test_kv_cache_logits_match_a_full_forward(converted):
    from moefold.generate import KVCache

    root, _ = converted
    job = load_job(str(root / "ckpt" / "config.toml"))
    model = Transformer(job.model, job.moe)
    load_checkpoint(root / "ckpt", model, None)
    model.eval()
    ids = torch.tensor([[3, 9, 27, 81, 243, 100, 7]])
    with torch.no_grad():
        full = model(ids)
        with KVCache(model) as cache:
            steps = [cache.forward(ids[:, :3])] + [
                cache.forward(ids[:, i : i + 1]) for i in range(3, 7)
            ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_upcycled_checkpoint_fine_tunes_under_nproc(tmp_path):
    _hf_llama(tmp_path / "dense")
    spec = UpcycleSpec(num_experts=4, topk=2)
    ckpt = commands.upcycle(tmp_path / "dense", tmp_path / "moe", spec, fmt="moefold")
    assert (ckpt / "tokenizer" / "tokenizer_config.json").is_file()
    job = load_job(str(ckpt / "config.toml"), ["parallel.ep=2"])
    assert job.train.lr == 1e-4  # not the from-scratch 3e-3
    check_job(job, 2)  # --nproc 2 --set parallel.ep=2, as the README shows
    config = json.loads((ckpt / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "</s>"
