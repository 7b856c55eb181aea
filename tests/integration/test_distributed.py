"""Swapped models train under DDP and FSDP2 with the same gradients as one process (STANDARDS 10).

Each test spawns 2 processes (torch.multiprocessing, spawn start method) that join a gloo process
group on 127.0.0.1, train on their halves of a global batch, and write what they saw (gradients of
the first step, parameters after the last) to ``tmp_path``; the test process trains the same model
on the full batch and compares. Every wait has a deadline, so a broken collective fails the test
instead of hanging CI.
"""

from __future__ import annotations

import datetime
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.spawn import ProcessException

from effnn import MonarchConfig, MonarchLinear, swap_linear

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="torch.distributed with the gloo backend is not available",
    ),
]

WORLD = 2
PG_TIMEOUT_S = 60  # collectives give up after this (init_process_group timeout)
TEST_TIMEOUT_S = 120  # the test kills its workers and fails after this
DIM, SEQ, CLASSES, BATCH, STEPS, SEED = 32, 4, 7, 8, 3, 1234
CONFIG = MonarchConfig(nblocks=4, init="project")
TOL = {"rtol": 1e-5, "atol": 1e-5}


# ---- the model: a 2-block transformer of nn.Linear layers, plus one MonarchLinear built directly


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        # no qkv bias: the key bias's gradient is zero up to rounding, and AdamW's normalised
        # step would turn that rounding noise into parameter differences between runs
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v))
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(DIM) for _ in range(2)])
        # built as a MonarchLinear (not swapped); nblocks=3 pads 32 -> 33 features and shards
        # unevenly (2 + 1 blocks) under FSDP2
        self.mix = MonarchLinear(DIM, DIM, nblocks=3)
        self.head = nn.Linear(DIM, CLASSES)  # 7 outputs: padded to 8 inside, odd bias shards

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.mix(x).mean(1))


def swapped_model() -> Net:
    """Net with every nn.Linear swapped for a MonarchLinear projected from it (seeded)."""
    torch.manual_seed(SEED)
    model = swap_linear(Net(), CONFIG)
    assert sum(isinstance(m, MonarchLinear) for m in model.modules()) == 2 * 4 + 2
    return model


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    xs = torch.randn(STEPS, BATCH, SEQ, DIM, generator=g)
    ys = torch.randint(0, CLASSES, (STEPS, BATCH), generator=g)
    return xs, ys


def train(model, named_params, optimizer, xs, ys, full):
    """``STEPS`` steps of mean cross-entropy; returns (first-step grads, final params) as full
    tensors (``full`` turns an FSDP2 DTensor into the full tensor: a collective)."""
    first_grads = None
    for x, y in zip(xs, ys, strict=True):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if first_grads is None:
            first_grads = {n: full(p.grad).detach().clone() for n, p in named_params()}
        optimizer.step()
    params = {n: full(p).detach().clone() for n, p in named_params()}
    return first_grads, params


def make_sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def make_adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


# ---- process launch -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker, port: int, tmp: str) -> None:
    torch.set_num_threads(1)  # two workers share the machine's cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        worker(rank, Path(tmp))
    except BaseException:
        # every rank's traceback reaches the test (the first failure is often on the other rank)
        (Path(tmp) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_workers(worker, tmp_path: Path) -> list[dict]:
    """Run ``worker(rank, tmp_path)`` in ``WORLD`` spawned processes; return what each saved."""
    ctx = mp.start_processes(
        _entry,
        args=(worker, _free_port(), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TEST_TIMEOUT_S
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TEST_TIMEOUT_S} s")
    except ProcessException as e:
        errors = [
            f"--- rank {r} ---\n{f.read_text()}"
            for r in range(WORLD)
            if (f := tmp_path / f"error{r}.txt").exists()
        ]
        pytest.fail("distributed worker failed:\n" + ("\n".join(errors) or str(e)), pytrace=False)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_same(results: list[dict], ref_grads: dict, ref_params: dict) -> None:
    for rank, res in enumerate(results):
        assert res["grads"].keys() == ref_grads.keys(), rank
        for name, g in ref_grads.items():
            torch.testing.assert_close(
                res["grads"][name], g, **TOL, msg=f"rank {rank}: grad of {name}"
            )
        for name, p in ref_params.items():
            torch.testing.assert_close(res["params"][name], p, **TOL, msg=f"rank {rank}: {name}")


def local_half(t: torch.Tensor, rank: int) -> torch.Tensor:
    half = t.shape[1] // WORLD
    return t[:, rank * half : (rank + 1) * half]


# ---- DDP ------------------------------------------------------------------------------------


def _ddp_worker(rank: int, tmp: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = swapped_model()  # same seed on every rank
    ddp = DDP(model)
    xs, ys = make_data()
    grads, params = train(
        ddp,
        model.named_parameters,
        make_sgd(ddp.parameters()),
        local_half(xs, rank),
        local_half(ys, rank),
        full=lambda t: t,
    )
    torch.save({"grads": grads, "params": params}, tmp / f"rank{rank}.pt")


def test_ddp_swapped_model_matches_one_process(tmp_path):
    results = run_workers(_ddp_worker, tmp_path)
    model = swapped_model()
    xs, ys = make_data()
    grads, params = train(
        model, model.named_parameters, make_sgd(model.parameters()), xs, ys, lambda t: t
    )
    assert_same(results, grads, params)


# ---- FSDP2 ----------------------------------------------------------------------------------


def _fsdp_worker(rank: int, tmp: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    # build and swap on meta: nothing is allocated or computed
    with torch.device("meta"):
        model = Net()
    swap_linear(model, CONFIG)
    assert all(p.is_meta for p in model.parameters())

    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")

    # reset_parameters works on the sharded (DTensor) parameters: values within MonarchLinear's
    # init bound on every local shard
    for m in model.modules():
        if isinstance(m, MonarchLinear):
            m.reset_parameters()
            for factor in (m.blkdiag1, m.blkdiag2):
                assert isinstance(factor, DTensor)
                local = factor.to_local()
                bound = 3**0.25 / factor.shape[2] ** 0.5
                assert local.numel() > 0  # nblocks >= WORLD: every rank holds blocks
                assert torch.isfinite(local).all() and 0 < local.abs().max() <= bound

    # the standard FSDP2 recipe to start from given weights: rank 0 holds the full state dict
    # (a checkpoint), the others receive their shards by broadcast
    full_sd = torch.load(tmp / "init.pt", weights_only=True) if rank == 0 else {}
    set_model_state_dict(
        model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )

    xs, ys = make_data()
    grads, params = train(
        model,
        model.named_parameters,
        make_adamw(model.parameters()),
        local_half(xs, rank),
        local_half(ys, rank),
        full=lambda t: t.full_tensor(),
    )
    torch.save({"grads": grads, "params": params}, tmp / f"rank{rank}.pt")


def test_fsdp2_meta_swapped_model_matches_one_process(tmp_path):
    model = swapped_model()
    torch.save(model.state_dict(), tmp_path / "init.pt")
    results = run_workers(_fsdp_worker, tmp_path)
    xs, ys = make_data()
    grads, params = train(
        model, model.named_parameters, make_adamw(model.parameters()), xs, ys, lambda t: t
    )
    assert_same(results, grads, params)
