"""The regularizers on FSDP2-sharded weights (DTensor, two gloo processes on the CPU) against one process, float64.

One spawn of two processes runs every check (starting them costs more than the checks). The model's layers
shard unevenly: 5 rows as 3 + 2, 1 row as 1 + 0 (an empty shard), 7 rows as 4 + 3, and one layer has all
magnitudes equal (VAR's exact-zero case). The reference is the same model, unsharded, in the same process.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from varprune.numerics import shards as sh
from varprune.numerics.optim import SAM, CrAM
from varprune.numerics.regularizers import HoyerSquareRegularizer, L1Regularizer, VarRegularizer

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 1)
        self.c = nn.Linear(1, 7)
        self.d = nn.Conv1d(7, 4, 3)

    def forward(self, x):
        h = self.c(self.b(torch.tanh(self.a(x))))
        return self.d(h.unsqueeze(-1).expand(-1, -1, 3)).flatten(1)


def make_net(equal_layer=True):
    torch.manual_seed(0)
    net = Net().double()
    if equal_layer:
        with torch.no_grad():
            net.c.weight.fill_(0.5)
    return net


def sharded(net):
    from torch.distributed.fsdp import fully_shard

    for child in net.children():
        fully_shard(child)
    return fully_shard(net)


def full(t):
    return t.full_tensor() if sh.is_dtensor(t) else t


def close(mine, ref, what):
    mine, ref = full(mine).detach(), ref.detach()
    scale = max(ref.abs().max().item(), 1e-300)
    diff = (mine - ref).abs().max().item() if ref.numel() else 0.0
    # relative 1e-10 of the tensor's largest entry; an exactly-zero reference must come out exactly zero
    assert diff <= 1e-10 * scale if scale > 1e-12 else diff <= 1e-12, f"{what}: {diff:.3g} vs {scale:.3g}"


def grads_close(mine_net, ref_net, what):
    for (name, p), q in zip(ref_net.named_parameters(), mine_net.parameters()):
        if p.grad is not None:
            close(q.grad, p.grad, f"{what} {name}")
        p.grad = q.grad = None


def regularizer_checks(rank):
    ref, mine = make_net(), sharded(make_net())
    assert sh.is_dtensor(mine.b.weight) and mine.b.weight.to_local().shape[0] == (1 if rank == 0 else 0)
    for cls, strength in [(VarRegularizer, 1e-3), (L1Regularizer, 0.1), (HoyerSquareRegularizer, 0.1)]:
        r_ref, r_mine = cls(ref, strength), cls(mine, strength)
        value_ref, value_mine = r_ref(), r_mine()
        close(value_mine, value_ref, f"{cls.name} value")
        value_ref.backward()
        value_mine.backward()
        grads_close(mine, ref, f"{cls.name} autograd gradient")
        for _ in range(2):  # the second call reuses the buffers
            close(r_mine.apply_gradient_(), r_ref.apply_gradient_(), f"{cls.name} closed-form value")
            grads_close(mine, ref, f"{cls.name} closed-form gradient")
    v_ref, v_mine = VarRegularizer.from_strength(ref, 0.1), VarRegularizer.from_strength(mine, 0.1)
    assert abs(v_mine.lam - v_ref.lam) <= 1e-12 * v_ref.lam and abs(v_mine.psi_init - v_ref.psi_init) <= 1e-10 * (
        v_ref.psi_init
    )
    variances_ref, variances_mine = v_ref.variances(), v_mine.variances()
    assert variances_mine.keys() == variances_ref.keys()
    assert variances_ref["c.weight"] == variances_mine["c.weight"] == 0
    for k in variances_ref:
        assert abs(variances_mine[k] - variances_ref[k]) <= 1e-12 * variances_ref["a.weight"], k
    v_ref.apply_gradient_()
    v_mine.apply_gradient_()
    close(v_mine.last_variances, v_ref.last_variances, "last_variances")


def sam_checks(rank, world):
    """VAR + SAM (VAR's gradient added once at w, as the training loop does) for two steps, each process
    taking its half of the batch (FSDP averages the halves' gradients: the whole batch's mean)."""
    ref, mine = make_net(equal_layer=False), sharded(make_net(equal_layer=False))
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    part = slice(3 * rank, 3 * rank + 3)
    for net, xs, ys in [(ref, x, y), (mine, x[part], y[part])]:
        opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        reg = VarRegularizer(net, 1e-4)
        opt.final_gradient_hooks = [reg.apply_gradient_]

        def closure(net=net, xs=xs, ys=ys):
            loss = (net(xs) - ys).square().mean()
            loss.backward()
            return loss

        for _ in range(2):
            opt.zero_grad()
            closure()
            opt.step(closure)
    for (name, p), q in zip(ref.named_parameters(), mine.parameters()):
        close(q, p, f"VAR+SAM weights {name}")


def selection_checks(rank, world):
    """The distributed top-k: each process's masks are its rows of one process's keep_mask_topk mask, ties
    (integer magnitudes, many equal) settled by one process's flat order, float32 and float64."""
    from varprune.numerics.pruning import keep_mask_topk

    g = torch.Generator().manual_seed(4)
    shapes = [(5, 3), (1, 4), (7, 2), (4, 7, 3)]
    shards = sh.Shards(dist.group.WORLD, rank, world)
    for dtype in (torch.float32, torch.float64):
        whole = [torch.randint(0, 4, s, generator=g).to(dtype) for s in shapes]
        flat = torch.cat([t.reshape(-1) for t in whole])
        for n_pruned in (0, 1, 17, 40, 41, 55, flat.numel() - 1, flat.numel()):
            ref = keep_mask_topk(flat, n_pruned).split([t.numel() for t in whole])
            mine = sh.keep_masks([t.chunk(world)[rank] if rank < len(t.chunk(world)) else t[:0] for t in whole],
                                 n_pruned, shards)  # fmt: skip
            for r, m, t in zip(ref, mine, whole):
                part = r.view(t.shape).chunk(world)
                want = part[rank] if rank < len(part) else r.view(t.shape)[:0]
                assert torch.equal(m, want), (dtype, n_pruned)


def cram_checks(rank, world):
    """VAR + CrAM+ (sparsities drawn alike; the mask selected over every shard) for two steps, as sam_checks."""
    ref, mine = make_net(equal_layer=False), sharded(make_net(equal_layer=False))
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    part = slice(3 * rank, 3 * rank + 3)
    for net, xs, ys in [(ref, x, y), (mine, x[part], y[part])]:
        opt = CrAM(net.parameters(), torch.optim.SGD, rho=0.05, sparsities=(0.3, 0.7), lr=0.1, momentum=0.9)
        reg = VarRegularizer(net, 1e-4)
        opt.final_gradient_hooks = [reg.apply_gradient_]

        def closure(net=net, xs=xs, ys=ys):
            loss = (net(xs) - ys).square().mean()
            loss.backward()
            return loss

        for _ in range(2):
            opt.zero_grad()
            closure()
            opt.step(closure)
    for (name, p), q in zip(ref.named_parameters(), mine.parameters()):
        close(q, p, f"VAR+CrAM+ weights {name}")


def gathering_checks():
    """engine.sharding's whole state (what --fsdp writes): the unsharded values, a tied weight still one tensor."""
    from varprune.engine.sharding import distribute_model_state, full_model_state

    def tied():
        net = make_net()
        net.e = nn.Linear(5, 3)
        net.e.weight = net.a.weight  # (5, 3): one parameter under two names
        return net

    from torch.distributed.fsdp import fully_shard

    ref, mine = tied(), tied()
    fully_shard(mine.d)
    fully_shard(mine)  # the tied weight in the root's unit, as GPT-2's embedding and head are under --fsdp
    whole = full_model_state(mine)
    assert whole.keys() == ref.state_dict().keys() and whole["e.weight"] is whole["a.weight"]
    for k, v in ref.state_dict().items():
        assert torch.equal(whole[k], v), k
    again = distribute_model_state(whole, mine)  # cut again: each process's own rows
    assert all(torch.equal(again[k].to_local(), v.to_local()) for k, v in mine.state_dict().items())


def worker(rank, world, store):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        regularizer_checks(rank)
        sam_checks(rank, world)
        selection_checks(rank, world)
        cram_checks(rank, world)
        gathering_checks()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes start and import torch: ~20 s on a loaded 2-core machine
def test_sharded_regularizers_equal_one_process(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(2, str(tmp_path / "store")), nprocs=2)


def test_fsdp1_and_mixed_weight_lists_are_refused_with_one_line(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with pytest.raises(sh.ShardingError, match="FSDP2") as e:
            VarRegularizer(FullyShardedDataParallel(make_net(), device_id=torch.device("cpu")), 1e-3)
        assert "\n" not in str(e.value)
        net = make_net()
        from torch.distributed.fsdp import fully_shard

        fully_shard(net.a)  # the root and the other layers left whole
        with pytest.raises(sh.ShardingError, match="fully_shard the root"):
            VarRegularizer(net, 1e-3)
    finally:
        dist.destroy_process_group()
