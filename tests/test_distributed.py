"""Model-parallel loss across ranks (gloo on CPU), against one process on the global batch.

Each test spawns W processes once (:mod:`ranks`) and runs its scenarios in them (process start-up
dominates the cost); results come back through files and are compared here.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from ranks import spawn

from unicom_kernels import DualPartialMarginLoss, class_range, dual_partial_margin_loss

D_IN, D, B = 12, 16, 5


def _global_data(world: int, num_classes: int, seed: int = 0, ignored: bool = True):
    gen = torch.Generator().manual_seed(seed)
    n = world * B
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    y[1] = y[0]  # a duplicate label
    if ignored:
        y[3] = -1
    w = 0.01 * torch.randn(num_classes, D, generator=gen, dtype=torch.float64)
    return x, y, w


CONFIGS = [
    dict(
        backend="torch",
        margin_type="arcface",
        margin_grad="straight_through",
        class_sample_rate=0.3,
        dim_sample_rate=0.5,
        dtype=torch.float32,
        scale=16.0,
        margin=0.4,
    ),
    dict(
        backend="reference",
        margin_type="cosface",
        margin_grad="exact",
        class_sample_rate=1.0,
        dim_sample_rate=0.75,
        dtype=torch.float64,
        scale=64.0,
        margin=-0.2,
    ),
    dict(
        backend="torch",
        margin_type="arcface",
        margin_grad="exact",
        class_sample_rate=0.1,
        dim_sample_rate=1.0,
        dtype=torch.float64,
        scale=16.0,
        margin=0.4,
    ),
    dict(
        backend="triton",  # interpreted on the CPU
        margin_type="arcface",
        margin_grad="exact",
        class_sample_rate=0.5,
        dim_sample_rate=0.5,
        dtype=torch.float32,
        scale=32.0,
        margin=0.3,
    ),
    # s * (1 + m) > 300: the global log-sum-exp agrees on a row max first.
    dict(
        backend="torch",
        margin_type="arcface",
        margin_grad="straight_through",
        class_sample_rate=0.5,
        dim_sample_rate=1.0,
        dtype=torch.float64,
        scale=320.0,
        margin=0.5,
    ),
]


def _scenario_match(rank, world, group):
    """Module forward/backward on every config; return what a single process must reproduce."""
    out = []
    num_classes = 3 * 7 + 2  # C % 3 != 0 and C % 2 != 0
    start, stop = class_range(num_classes, rank, world)
    for i, cfg in enumerate(CONFIGS):
        cfg = dict(cfg)
        dtype = cfg.pop("dtype")
        x, y, w = _global_data(world, num_classes, seed=i)
        crit = DualPartialMarginLoss(num_classes, D, process_group=group, seed=5, **cfg)
        crit.to(dtype)
        with torch.no_grad():
            crit.weight.copy_(w[start:stop])
        steps = []
        for _ in range(2):  # two steps: different samples, same across ranks where it must be
            crit.weight.grad = None
            xl = x[rank * B : (rank + 1) * B].to(dtype).requires_grad_()
            loss = crit(xl, y[rank * B : (rank + 1) * B])
            loss.backward()
            steps.append(
                dict(
                    loss=loss.detach(),
                    x_grad=xl.grad,
                    w_grad=crit.weight.grad.clone(),
                    class_index=crit.last_class_index,
                    dim_index=crit.last_dim_index,
                )
            )
        out.append(dict(steps=steps, range=(start, stop), config=i))
    return {"configs": out}


def _close(got, expected, eps):
    """Equal up to ``eps`` relative to the largest entry (different summation orders)."""
    torch.testing.assert_close(got, expected, rtol=eps, atol=eps * float(expected.abs().max()))


def test_matches_single_process(tmp_path):
    for world in (2, 3):
        results = spawn(world, _scenario_match, tmp_path / f"w{world}")
        num_classes = 23
        for i, cfg in enumerate(CONFIGS):
            cfg = dict(cfg)
            dtype = cfg.pop("dtype")
            eps = 1e-5 if dtype == torch.float32 else 1e-10
            x, y, w = _global_data(world, num_classes, seed=i)
            for step in range(2):
                per_rank = [res["configs"][i]["steps"][step] for res in results]
                dims = per_rank[0]["dim_index"]
                for r, got in enumerate(per_rank):
                    start, stop = class_range(num_classes, r, world)
                    assert (got["dim_index"] is None) == (dims is None)
                    if dims is not None:
                        assert torch.equal(got["dim_index"], dims), "dimension subsets differ across ranks"
                    positives = y[(y >= start) & (y < stop)].unique()
                    assert torch.isin(positives, got["class_index"]).all(), "a positive was not sampled"
                    assert ((got["class_index"] >= start) & (got["class_index"] < stop)).all()
                    expected_n = max(positives.numel(), int(cfg["class_sample_rate"] * (stop - start)), 1)
                    assert got["class_index"].numel() == expected_n
                if dims is not None and step == 1:
                    prev = results[0]["configs"][i]["steps"][0]["dim_index"]
                    assert not torch.equal(prev, dims), "the dimension subset did not change between steps"
                class_index = torch.cat([got["class_index"] for got in per_rank])
                xs = x.to(dtype, copy=True).requires_grad_()
                ws = w.to(dtype, copy=True).requires_grad_()
                loss = dual_partial_margin_loss(
                    xs,
                    ws,
                    y,
                    class_index=class_index,
                    dim_index=dims,
                    **{k: v for k, v in cfg.items() if k not in ("class_sample_rate", "dim_sample_rate")},
                )
                loss.backward()
                for r, got in enumerate(per_rank):
                    start, stop = class_range(num_classes, r, world)
                    assert torch.equal(got["loss"], per_rank[0]["loss"]), "ranks returned different losses"
                    _close(got["loss"], loss.detach(), eps)
                    # The reduce-scattered embedding gradient is scaled by W for DDP's averaging.
                    _close(got["x_grad"], world * xs.grad[r * B : (r + 1) * B], eps)
                    _close(got["w_grad"], ws.grad[start:stop], eps)


def _unchecked_step(group, rank, world, labels):
    """Loss and gradients of the module (sharded over ``group``, or not) without value checks on the
    global ``labels``."""
    num_classes = 7
    x, _, w = _global_data(world, num_classes)
    x[0] = float("nan")  # the row whose label is out of range: dropped rows are zeroed first
    start, stop = class_range(num_classes, rank, world)
    crit = DualPartialMarginLoss(num_classes, D, check_values=False, class_sample_rate=1.0, dim_sample_rate=1.0,
                                 process_group=group).double()  # fmt: skip
    with torch.no_grad():
        crit.weight.copy_(w[start:stop])
    xl = x[rank * B : (rank + 1) * B].clone().requires_grad_()
    loss = crit(xl, labels[rank * B : (rank + 1) * B])
    loss.backward()
    return [loss.detach(), xl.grad, crit.weight.grad]


def _scenario_unchecked_out_of_range(rank, world, group):
    _, y, _ = _global_data(world, 7)
    dropped = y.clone()
    rows = [0, B + 1] if world > 1 else [0, 1]
    dropped[rows[0]], dropped[rows[1]] = 7 + 3, -5  # outside [0, C), neither is ignore_index
    ignored = y.clone()
    ignored[rows] = -1
    return {
        name: _unchecked_step(group, rank, world, labels)
        for name, labels in (("dropped", dropped), ("ignored", ignored))
    }


def test_unchecked_out_of_range_labels_drop_their_rows_as_ignored_ones(tmp_path):
    """Without value checks a label outside [0, C) drops its row as an ignored one: sharded, the row
    entered the mean with a target logit of 0 (22.40 became 21.23 at W=2) and got a gradient; in one
    process its NaN embedding reached the prototypes' gradient."""
    results = [*spawn(2, _scenario_unchecked_out_of_range, tmp_path), _scenario_unchecked_out_of_range(0, 1, None)]
    for res in results:
        for got, want in zip(res["dropped"], res["ignored"], strict=True):
            assert torch.equal(got, want)
        assert all(torch.isfinite(t).all() for t in res["dropped"])


def _ddp_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 32), torch.nn.Tanh(), torch.nn.Linear(32, D))


def _ddp_data(world: int, num_classes: int):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(world * B, D_IN, generator=gen), torch.randint(0, num_classes, (world * B,), generator=gen)


def _scenario_ddp(rank, world, group):
    num_classes = 11
    start, stop = class_range(num_classes, rank, world)
    inputs, labels = _ddp_data(world, num_classes)
    model = torch.nn.parallel.DistributedDataParallel(_ddp_model(), process_group=group)
    crit = DualPartialMarginLoss(num_classes, D, class_sample_rate=0.5, dim_sample_rate=0.75, process_group=group)
    with torch.no_grad():
        crit.weight.copy_(0.01 * torch.randn(num_classes, D, generator=torch.Generator().manual_seed(2))[start:stop])
    opt = torch.optim.SGD([*model.parameters(), *crit.parameters()], lr=0.5)
    rows = slice(rank * B, (rank + 1) * B)
    loss = crit(model(inputs[rows]), labels[rows])
    loss.backward()
    opt.step()
    return {
        "model": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
        "shard": crit.weight.detach().clone(),
        "class_index": crit.last_class_index,
        "dim_index": crit.last_dim_index,
        "loss": loss.detach(),
    }


def test_ddp_step_equals_single_process(tmp_path):
    world, num_classes = 2, 11
    results = spawn(world, _scenario_ddp, tmp_path)
    inputs, labels = _ddp_data(world, num_classes)
    model = _ddp_model()
    protos = torch.nn.Parameter(0.01 * torch.randn(num_classes, D, generator=torch.Generator().manual_seed(2)))
    opt = torch.optim.SGD([*model.parameters(), protos], lr=0.5)
    class_index = torch.cat([res["class_index"] for res in results])
    loss = dual_partial_margin_loss(
        model(inputs), protos, labels, class_index=class_index, dim_index=results[0]["dim_index"]
    )
    loss.backward()
    opt.step()
    for r, res in enumerate(results):
        start, stop = class_range(num_classes, r, world)
        torch.testing.assert_close(res["loss"], loss.detach())
        for name, value in model.state_dict().items():
            torch.testing.assert_close(res["model"][name], value, msg=f"rank {r}: {name} differs")
        torch.testing.assert_close(res["shard"], protos.detach()[start:stop])


def _failure(rank, world, group, make_call):
    try:
        make_call(rank)
    except (TypeError, ValueError) as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None}


def _scenario_failures(rank, world, group):
    num_classes = 10
    start, stop = class_range(num_classes, rank, world)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, D, generator=gen), torch.randint(0, num_classes, (B,), generator=gen)
    shard = torch.randn(stop - start, D, generator=gen)

    def call(**kw):
        args = dict(embeddings=x, prototypes=shard, labels=y) | kw
        return dual_partial_margin_loss(
            args.pop("embeddings"), args.pop("prototypes"), args.pop("labels"), process_group=group, **args
        )

    bad_label = y.clone()
    bad_label[2] = num_classes
    cases = {
        "batch": lambda r: call(embeddings=x[: B - r], labels=y[: B - r]),
        "label": lambda r: call(labels=bad_label if r == 1 else y),
        "options": lambda r: call(margin=0.3 + 0.1 * r),
        "dims": lambda r: call(dim_sample_rate=0.5, generator=torch.Generator().manual_seed(r)),
        "local_type": lambda r: call(embeddings=x.long() if r == 1 else x),
        "shards": lambda r: call(prototypes=shard[1:] if r == 0 else shard),
        "class_index": lambda r: call(
            class_index=torch.arange(start, stop - 1) if r == 1 else torch.arange(start, stop)
        ),
        "nonfinite": lambda r: call(embeddings=x.clone().fill_(float("nan")) if r == 0 else x),
    }
    results = {name: _failure(rank, world, group, case) for name, case in cases.items()}
    ok = call()  # the group still works afterwards
    return {"failures": results, "ok": ok}


def test_failures_raise_on_every_rank(tmp_path):
    results = spawn(2, _scenario_failures, tmp_path)
    expected = {
        "batch": "batch size",
        "label": "labels",
        "options": "margin: 0.3 on rank 0",
        "dims": "dimension subset",
        "local_type": "embeddings",
        "shards": "prototypes",
        "class_index": "class_index",
        "nonfinite": "NaN",
    }
    for name, needle in expected.items():
        for r, res in enumerate(results):
            got = res["failures"][name]
            assert got["error"] is not None, f"{name}: rank {r} did not raise"
            assert needle in got["message"], f"{name}: rank {r}: {got['message']}"
    assert [res["failures"]["nonfinite"]["error"] for res in results] == ["NonFiniteError"] * 2
    assert results[1]["failures"]["local_type"]["error"] == "TypeError"
    assert results[0]["failures"]["local_type"]["error"] == "ValueError"  # told that rank 1 rejected its input
    assert torch.equal(results[0]["ok"], results[1]["ok"])


def _scenario_checkpoint(rank, world, group):
    crit = DualPartialMarginLoss(9, D, process_group=group, seed=3)
    x, y = torch.randn(B, D), torch.randint(0, 9, (B,))
    crit(x, y)
    state = crit.state_dict()
    gathered = [None] * world
    dist.all_gather_object(gathered, state)
    same = DualPartialMarginLoss(9, D, process_group=group)
    same.load_state_dict(state)
    try:
        DualPartialMarginLoss(9, D, process_group=group).load_state_dict(gathered[1 - rank])
        wrong = None
    except ValueError as exc:
        wrong = str(exc)
    return {
        "step": same.step,
        "seed": same.seed,
        "equal": torch.equal(same.weight, crit.weight),
        "wrong": wrong,
        "range": crit.class_range,
        "rows": crit.weight.shape[0],
    }


def test_shard_checkpoints(tmp_path):
    results = spawn(2, _scenario_checkpoint, tmp_path)
    assert [r["range"] for r in results] == [(0, 5), (5, 9)] and [r["rows"] for r in results] == [5, 4]
    for res in results:
        assert res["step"] == 1 and res["seed"] == 3 and res["equal"]
        assert res["wrong"] is not None and "shard" in res["wrong"]


def test_class_range_blocks():
    for classes in (1, 7, 100, 101):
        for world in (1, 2, 3, 8):
            if classes < world:
                continue
            ranges = [class_range(classes, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == classes
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
