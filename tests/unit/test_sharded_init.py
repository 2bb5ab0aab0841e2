"""Layout-invariant init by name and global index: any slice equals that slice of the full
tensor, and a meta-device model materialised with recorded cuts holds exactly those slices."""

import pytest
import torch

from moefold.config import load_job
from moefold.model import build_model, materialize
from moefold.model.init import parameter_values
from moefold.parallel.apply import shard_index
from moefold.parallel.data_parallel import mark_family
from tests.equivalence.layouts import TINY

JOB = load_job("tiny-moe", list(TINY))


@pytest.mark.parametrize(
    "name, shape, index",
    [
        ("layers.0.mlp.experts.gate_proj", (8, 32, 16), (slice(2, 4), slice(0, 32), slice(8, 16))),
        ("layers.1.mlp.experts.down_proj", (8, 16, 32), (slice(7, 8), slice(4, 8), slice(0, 32))),
        ("layers.0.attn.q_proj.weight", (64, 32), (slice(16, 32), slice(0, 32))),
        ("layers.0.attn.o_proj.weight", (32, 64), (slice(0, 32), slice(48, 64))),
        ("layers.0.attn_norm.weight", (32,), (slice(8, 16),)),
    ],
)
def test_any_slice_equals_the_slice_of_the_full_tensor(name, shape, index):
    full = parameter_values(name, torch.Size(shape), JOB.model, seed=3)
    part = parameter_values(name, torch.Size(shape), JOB.model, seed=3, index=index)
    assert torch.equal(part, full[index])
    assert full.std() > 0 or "norm" in name  # real values, not a constant


def test_meta_model_materialises_to_the_eager_model():
    eager = build_model(JOB)
    meta = build_model(JOB, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    materialize(meta, JOB.model, JOB.train.seed, torch.device("cpu"))
    assert eager.state_dict().keys() == meta.state_dict().keys()
    for key, value in eager.state_dict().items():
        assert torch.equal(value, meta.state_dict()[key]), key
    router = meta.layers["0"].mlp.router
    assert router.step_tokens_per_expert.device.type == "cpu"


class _Coords:
    """The two ParallelGroups methods shard_index reads."""

    def __init__(self, **coords_and_sizes):
        self.values = coords_and_sizes

    def size(self, family):
        return self.values[family][1]

    def coord(self, family):
        return self.values[family][0]


@pytest.mark.parametrize("ep, etp, tp", [(2, 2, 1), (4, 1, 2), (1, 4, 4)])
def test_recorded_cuts_materialise_this_ranks_slices(ep, etp, tp):
    """Cut a meta model as apply_ep / apply_tp do (last coordinate of every group, so offsets
    matter), materialise it, and compare with slices of the eager model."""
    eager = dict(build_model(JOB).named_parameters())
    groups = _Coords(ep=(ep - 1, ep), etp=(etp - 1, etp), tp=(tp - 1, tp))
    model = build_model(JOB, device="meta")
    expected = {}
    for module_name, module in model.named_modules():
        for key, param in list(module.named_parameters(recurse=False)):
            name = f"{module_name}.{key}"
            full = eager[name]
            if ".experts." in name:
                ffn_dim = 1 if key == "down_proj" else 2
                cuts = (("ep", 0), ("etp", ffn_dim))
            elif name.endswith(("q_proj.weight", "mlp.gate_proj.weight")):
                cuts = (("tp", 0),)
            elif name.endswith("o_proj.weight"):
                cuts = (("tp", 1),)
            else:
                continue
            index = _block(full.shape, cuts, groups)
            local = torch.nn.Parameter(param[index])
            mark_family(local, "expert" if ".experts." in name else "tensor", cuts)
            setattr(module, key, local)
            expected[name] = full.detach()[index]
    materialize(model, JOB.model, JOB.train.seed, torch.device("cpu"), shard_index(groups))
    got = dict(model.named_parameters())
    assert expected
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert all(not p.is_meta for p in model.parameters())


def _block(shape, cuts, groups):
    """Outermost cut first, each keeps its coordinate's contiguous block."""
    index = [slice(0, n) for n in shape]
    for family, dim in cuts:
        start, stop = index[dim].start, index[dim].stop
        width = (stop - start) // groups.size(family)
        begin = start + groups.coord(family) * width
        index[dim] = slice(begin, begin + width)
    return tuple(index)
