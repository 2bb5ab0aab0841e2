"""Multi-token prediction (model/mtp.py): the shifted ids and labels of a shard, and the
training loss and its gradients against DeepSeek-V3's definition written out by hand."""

import pytest
import torch
import torch.nn.functional as F

from moefold.config import load_job
from moefold.model.init import init_parameters
from moefold.model.mtp import IGNORE, mtp_shard
from moefold.model.transformer import SequencePositions, Transformer, model_rotary_tables
from moefold.train.step_runner import TrainingLoss

OVERRIDES = (
    "model.hidden=32",
    "model.layers=2",
    "model.heads=2",
    "model.kv_heads=2",
    "model.ffn_hidden=48",
    "model.vocab_size=50",
    "model.q_lora_rank=12",
    "model.kv_lora_rank=8",
    "model.qk_nope_head_dim=6",
    "model.qk_rope_head_dim=4",
    "model.v_head_dim=6",
    "model.mtp_depths=2",
    "moe.num_experts=4",
    "moe.topk=2",
    "moe.ffn_hidden=16",
    "moe.num_groups=2",
    "moe.group_topk=1",
    "moe.shared_ffn_hidden=16",
)


@pytest.mark.parametrize("cp, tp", [(1, 1), (2, 1), (2, 2)])
def test_shard_holds_the_ids_and_labels_at_p_plus_k(cp, tp):
    seq_len, depths = 16, 2
    batch = torch.arange(100, 100 + 2 * (seq_len + 1)).view(2, seq_len + 1)
    for cp_rank in range(cp):
        for tp_rank in range(tp):
            local = SequencePositions(cp, cp_rank, tp, tp_rank).local(seq_len)
            ids, labels = mtp_shard(batch, local, depths)
            assert ids.shape == labels.shape == (2, seq_len // (cp * tp), depths + 1)
            for j, p in enumerate(local.tolist()):
                for k in range(depths + 1):
                    want_id = batch[:, p + k] if p + k <= seq_len else torch.zeros(2)
                    want_label = batch[:, p + k + 1] if p + k + 1 <= seq_len else IGNORE
                    torch.testing.assert_close(ids[:, j, k], want_id.to(ids.dtype) * 1)
                    assert (labels[:, j, k] == want_label).all()
            # column 0 is exactly the non-MTP shard
            assert torch.equal(ids[..., 0], batch[:, :-1][:, local])
            assert torch.equal(labels[..., 0], batch[:, 1:][:, local])


def _model(coeff_overrides=()):
    job = load_job("tiny-deepseek", [*OVERRIDES, *coeff_overrides])
    torch.manual_seed(0)
    model = Transformer(job.model, job.moe)
    init_parameters(model, job.model, seed=3)
    with torch.no_grad():  # non-trivial norms, so swapping hnorm/enorm would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return job, model


def _reference_loss(model, batch, coeff):
    """DeepSeek-V3 eq. 21-25 by hand: h^0 the last block's output, depth k embeds t_{i+k},
    predicts t_{i+k+1}, loss sum over valid i divided by T, mean over depths."""
    B, S = batch.shape[0], batch.shape[1] - 1
    positions = torch.arange(S)
    rope = model_rotary_tables(positions, model.cfg)

    def rms(x, norm):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    h = model.embed(batch[:, :S])
    for block in model.layers.values():
        h = block(h, positions, rope)
    head = model.lm_head.weight
    logits = rms(h, model.norm) @ head.T
    main = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    depth_losses = []
    for k, depth in enumerate(model.mtp.values(), start=1):
        ids = torch.cat([batch[:, k:], torch.zeros(B, k - 1, dtype=batch.dtype)], dim=1)
        emb = model.embed(ids)  # t_{i+k} for i < S (0 past the end)
        x = torch.cat([rms(emb, depth.enorm), rms(h, depth.hnorm)], dim=-1) @ depth.eh_proj.weight.T
        h = depth.block(x, positions, rope)
        logits_k = rms(h, depth.final_norm) @ head.T
        valid = S - k  # positions i with a target t_{i+k+1}
        ce = F.cross_entropy(
            logits_k[:, :valid].flatten(0, 1), batch[:, k + 1 :].flatten(), reduction="sum"
        )
        depth_losses.append(ce / (B * S))
    mtp = torch.stack(depth_losses).mean()
    return main + coeff * mtp, main, mtp


def test_loss_and_gradients_equal_the_hand_written_definition():
    job, model = _model(("train.mtp_loss_coeff=0.3",))
    batch = torch.randint(0, job.model.vocab_size, (3, 13))
    ids, labels = mtp_shard(batch, torch.arange(12), job.model.mtp_depths)
    loss_fn = TrainingLoss(0.3)
    logits = model(ids)
    assert logits.shape == (3, 12, 3, job.model.vocab_size)
    loss = loss_fn(logits, labels)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    main_sum, mtp_sum = loss_fn.take()

    ref, ref_main, ref_mtp = _reference_loss(model, batch, 0.3)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(main_sum, ref_main.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mtp_sum, ref_mtp.detach(), rtol=1e-5, atol=1e-6)
    assert ref_mtp > 1.0  # the MTP term is not negligible, so the comparison sees it
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        if r is None:
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # every MTP weight receives a gradient; the main path does not see the MTP depths
    assert all(g is not None and g.abs().sum() > 0 for n, g in zip(names, grads) if "mtp." in n)
    torch.testing.assert_close(model(ids[..., 0]), logits[:, :, 0])


def test_tiny_model_counts_the_mtp_parameters():
    from moefold.model.size import count_parameters, flops_per_token

    job, model = _model()
    built = sum(p.numel() for p in model.parameters())
    assert count_parameters(job.model, job.moe).total == built
    mtp_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert count_parameters(job.model, job.moe).mtp == mtp_params
    base = load_job("tiny-deepseek", [*OVERRIDES, "model.mtp_depths=0"])
    assert flops_per_token(job.model, job.moe, 16) > flops_per_token(base.model, base.moe, 16)


def test_pipeline_stages_carry_the_depth_embeddings():
    """First, middle and last stage (forward_layers) chained equal the whole model, and the
    gradient reaches the embedding through the carried MTP embeddings."""
    job, model = _model()
    batch = torch.randint(0, job.model.vocab_size, (2, 9))
    ids, _ = mtp_shard(batch, torch.arange(8), job.model.mtp_depths)
    whole = model(ids)
    x = model.forward_layers(ids, ["0"], first=True, last=False)
    assert x.shape == (2, 8, 3 * job.model.hidden)
    x = model.forward_layers(x, ["1"], first=False, last=False)
    staged = model.forward_layers(x, [], first=False, last=True)
    torch.testing.assert_close(staged, whole, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(staged[:, :, 2].logsumexp(-1).sum(), model.embed.weight)
    (want,) = torch.autograd.grad(whole[:, :, 2].logsumexp(-1).sum(), model.embed.weight)
    torch.testing.assert_close(grad, want)
    assert grad[ids[..., 2].unique()].abs().sum() > 0


@pytest.mark.parametrize("mode", ["full", "moe"])
def test_recompute_covers_the_depth_blocks(mode):
    job, model = _model()
    batch = torch.randint(0, job.model.vocab_size, (2, 9))
    ids, labels = mtp_shard(batch, torch.arange(8), job.model.mtp_depths)
    params = list(model.parameters())
    want = torch.autograd.grad(TrainingLoss(0.3)(model(ids), labels), params, allow_unused=True)
    model.set_recompute(mode)
    assert all(depth.block.recompute == mode for depth in model.mtp.values())
    got = torch.autograd.grad(TrainingLoss(0.3)(model(ids), labels), params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
