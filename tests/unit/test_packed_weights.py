"""weights.pack_rows / joint_rows: the runner's q/k/v (and gate/up) weights as one block (one GEMM), values and bytes kept."""
import torch

from vl_core.encoders import weights as weights_mod


def test_pack_rows_keeps_values_and_bytes_and_refuses_what_it_cannot_pack():
    g = torch.Generator().manual_seed(5)
    lins = [torch.nn.Linear(16, n, bias=False) for n in (32, 8, 8)]
    before = [m.weight.detach().clone() for m in lins]
    x = torch.randn(5, 16, generator=g)
    separate = [m(x) for m in lins]
    assert weights_mod.joint_rows([m.weight for m in lins]) is None
    assert weights_mod.pack_rows(lins) is True and weights_mod.pack_rows(lins) is False   # packed once
    joint = weights_mod.joint_rows([m.weight for m in lins])
    assert joint.shape == (48, 16) and joint.data_ptr() == lins[0].weight.data_ptr()
    assert all(torch.equal(m.weight, b) and isinstance(m.weight, torch.nn.Parameter) for m, b in zip(lins, before))
    assert sum(m.weight.nbytes for m in lins) == joint.nbytes
    torch.testing.assert_close(torch.nn.functional.linear(x, joint), torch.cat(separate, dim=-1))
    lins[1].weight.data = lins[1].weight.data.clone()           # one moved: no longer one block
    assert weights_mod.joint_rows([m.weight for m in lins]) is None
    assert weights_mod.joint_rows([m.weight for m in reversed(lins)]) is None   # order matters
    biased = [torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)]
    mixed = [torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8, bias=False).double()]
    wide = [torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(12, 8, bias=False)]
    assert not any(weights_mod.pack_rows(ms) for ms in (biased, mixed, wide))
