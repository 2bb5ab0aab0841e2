"""Analytic parameter counts against published figures, and FLOPs against hand counts."""

import pytest

from moefold.config import ModelConfig, MoEConfig, check_job, load_job, preset_names
from moefold.model.size import count_parameters, describe, flops_per_token

# (preset, published total, published active, relative tolerance). Published figures are
# rounded to 2-3 significant digits, hence the 1% tolerance (141B is 140.63B).
PUBLISHED = [
    ("mixtral-8x7b", 46.7e9, 12.9e9, 0.01),  # Mistral AI's Mixtral announcement
    ("mixtral-8x22b", 141e9, 39e9, 0.01),  # Mistral AI's Mixtral 8x22B announcement
    ("qwen2-57b-a14b", 57.4e9, 14.2e9, 0.01),  # 57B / 14B by name, 57.4B / 14.2B as quoted
    # Model card: 30.5B / 3.3B. Counted: 3.353B active, i.e. the card truncates rather than
    # rounds; no convention gives 3.30B (without the input embedding it is 3.04B).
    ("qwen3-30b-a3b", 30.5e9, 3.3e9, 0.02),
    # Model card: 671B main model / 37B activated (counted 671.03B / 37.55B; the card's active
    # figure leaves out part of the embedding and head, docs/deepseek.md).
    ("deepseek-v3", 671e9, 37e9, 0.02),
    ("deepseek-v2-lite", 15.7e9, 2.66e9, 0.01),  # card: 15.7B / 2.4B (2.66B counted as above)
    # No published figures: derived by hand in the preset comments and checked against the
    # models they come from in the tests below.
    ("llama3-8x70b", 465.16e9, 126.93e9, 0.001),  # Llama-3-70B upcycled, 8 experts top-2
    ("mixtral-8x22b-g8t8", 140.65e9, 22.27e9, 0.001),  # 8x22B, experts split 8 ways, top-8
]


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads_and_passes_check_job(preset):
    check_job(load_job(preset), 1)


@pytest.mark.parametrize(
    ("preset", "total", "active", "rel"), PUBLISHED, ids=[row[0] for row in PUBLISHED]
)
def test_full_size_presets_match_published_parameter_counts(preset, total, active, rel):
    job = load_job(preset)
    counts = count_parameters(job.model, job.moe)
    assert counts.total == pytest.approx(total, rel=rel)
    assert counts.active == pytest.approx(active, rel=rel)


def test_llama3_8x70b_with_one_expert_per_layer_is_llama3_70b():
    job = load_job("llama3-8x70b")
    upcycled = count_parameters(job.model, job.moe)
    dense = count_parameters(job.model, MoEConfig())
    # The dense MLP becomes every expert: 7 more copies per layer plus an 8-row router.
    extra = job.model.layers * (7 * 3 * 8192 * 28672 + 8 * 8192)
    assert upcycled.total == dense.total + extra
    assert dense.total == pytest.approx(70.6e9, rel=0.001)  # Llama-3-70B's published size


def test_g8t8_keeps_expert_weights_and_halves_active_expert_weights():
    coarse_job, fine_job = load_job("mixtral-8x22b"), load_job("mixtral-8x22b-g8t8")
    coarse = count_parameters(coarse_job.model, coarse_job.moe)
    fine = count_parameters(fine_job.model, fine_job.moe)
    assert fine.experts == coarse.experts
    assert fine.router == 8 * coarse.router
    coarse_active_experts = coarse.active - (coarse.total - coarse.experts)
    fine_active_experts = fine.active - (fine.total - fine.experts)
    assert 2 * fine_active_experts == coarse_active_experts  # top-8 of 1/8 width vs top-2


def test_describe_formats_total_and_active():
    job = load_job("mixtral-8x7b")
    assert describe(job.model, job.moe) == "46.70B total, 12.88B active"


def _tiny_model(**overrides):
    # D=16, L=3, H=4, KV=2, hd=8 (q width 32 > D is allowed through head_dim), F=40, V=100.
    fields = dict(
        hidden=16, layers=3, heads=4, kv_heads=2, head_dim=8, ffn_hidden=40, vocab_size=100
    )
    return ModelConfig(**(fields | overrides))


def _tiny_moe(**overrides):
    # Layer 0 dense, layers 1 and 2 MoE: E=4, K=2, Fe=12, shared Fs=20 with a gate.
    fields = dict(
        num_experts=4,
        topk=2,
        ffn_hidden=12,
        first_dense_layers=1,
        shared_ffn_hidden=20,
        shared_gate=True,
    )
    return MoEConfig(**(fields | overrides))


def test_count_parameters_by_hand_on_a_tiny_config():
    counts = count_parameters(_tiny_model(attn_bias=True, qk_norm=True), _tiny_moe())
    assert counts.embedding == 2 * 100 * 16
    # q 16*32, k and v 16*16 each, o 32*16, biases 32 + 16 + 16
    assert counts.attention == 3 * (512 + 256 + 256 + 512 + 64)
    assert counts.norms == 3 * (16 + 16 + 8 + 8) + 16
    assert counts.dense_mlp == 1 * 3 * 16 * 40
    assert counts.experts == 2 * 4 * 3 * 16 * 12
    assert counts.shared == 2 * (3 * 16 * 20 + 16)
    assert counts.router == 2 * 4 * 16
    assert counts.total == 3200 + 4800 + 160 + 1920 + 4608 + 1952 + 128
    assert counts.active == counts.total - 2 * (4 - 2) * 3 * 16 * 12


def test_tied_embeddings_are_counted_once():
    untied = count_parameters(_tiny_model(), _tiny_moe())
    tied = count_parameters(_tiny_model(tie_embeddings=True), _tiny_moe())
    assert untied.total - tied.total == 100 * 16
    assert tied.embedding == 100 * 16


def test_dense_model_is_all_active():
    counts = count_parameters(_tiny_model(), MoEConfig())
    assert counts.active == counts.total
    assert counts.experts == counts.router == counts.shared == 0
    assert counts.dense_mlp == 3 * 3 * 16 * 40


def test_flops_per_token_by_hand_on_a_tiny_config():
    seq_len = 10
    projections = 2 * 16 * 32 + 2 * 2 * 16 * 16 + 2 * 32 * 16  # q, k and v, o
    scores = 2 * 10 * 32 // 2 + 2 * 10 * 32 // 2  # QK^T and PV over the causal half
    dense = 2 * 3 * 16 * 40
    moe = 2 * 16 * 4 + 2 * (2 * 3 * 16 * 12) + 2 * 3 * 16 * 20 + 2 * 16
    lm_head = 2 * 16 * 100
    forward = 3 * (projections + scores) + dense + 2 * moe + lm_head
    model, moe_cfg = _tiny_model(attn_bias=True, qk_norm=True), _tiny_moe()
    assert flops_per_token(model, moe_cfg, seq_len, training=False) == forward
    assert flops_per_token(model, moe_cfg, seq_len) == 3 * forward


def test_flops_count_only_the_topk_experts_and_ignore_capacity():
    model = _tiny_model()
    top1 = flops_per_token(model, _tiny_moe(topk=1), 10)
    top2 = flops_per_token(model, _tiny_moe(topk=2), 10)
    assert top2 - top1 == 3 * 2 * (2 * 3 * 16 * 12)  # training x3, two MoE layers
    dropping = _tiny_moe(capacity_factor=1.0)
    assert flops_per_token(model, dropping, 10) == flops_per_token(model, _tiny_moe(), 10)


def test_tiny_moe_worked_example_in_docs_flops_md():
    job = load_job("tiny-moe")
    counts = count_parameters(job.model, job.moe)
    assert (counts.total, counts.active) == (4_396_160, 2_036_864)
    assert flops_per_token(job.model, job.moe, job.train.seq_len, training=False) == 3_153_920
    assert flops_per_token(job.model, job.moe, job.train.seq_len) == 9_461_760


def test_flops_reject_empty_sequences():
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(_tiny_model(), _tiny_moe(), 0)


def test_mixtral_training_flops_are_close_to_six_times_active_parameters():
    # Sanity check of the whole formula at full size: matmul FLOPs ~ 6 * active non-embedding
    # parameters (+ LM head) per token, plus causal attention scores 6*S*H*hd per layer.
    job = load_job("mixtral-8x7b")
    counts = count_parameters(job.model, job.moe)
    matmul_params = counts.active - counts.embedding // 2 - counts.norms
    attention_scores = 3 * job.model.layers * 2 * 4096 * 4096
    expected = 6 * matmul_params + attention_scores
    assert flops_per_token(job.model, job.moe, 4096) == pytest.approx(expected, rel=1e-12)
