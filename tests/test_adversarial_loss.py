"""Hostile inputs to the loss that once gave a silent wrong number, a hang or a bare traceback.

Each case stays here so that it stays fixed: label dtypes, higher-order gradients, NaN and
inf reaching the fused kernels, odd argument types, and one rank failing while the others
wait in a collective.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import margined_target_logit
from ranks import spawn

import unicom_kernels.loss as loss_module
from unicom_kernels import DualPartialMarginLoss, class_range, dual_partial_margin_loss, reference

BACKENDS = ("reference", "torch", "triton")  # triton is interpreted on the CPU
B, C, D = 7, 300, 12


def _inputs(seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen, dtype=dtype)
    w = torch.randn(C, D, generator=gen, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=gen)
    return x, w, y


def _dtype(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else torch.float64


# --------------------------------------------------------------------------- label dtypes


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_label_255_is_a_class_not_ignored(backend):
    x, w, y = _inputs(dtype=_dtype(backend))
    y = y % 256
    y[[0, 3]] = 255
    got = dual_partial_margin_loss(x, w, y.to(torch.uint8), backend=backend)
    expected = dual_partial_margin_loss(x, w, y, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_label_dtypes_are_range_checked(dtype):
    x, w, y = _inputs()
    y = y % 10
    y[2] = 127 if dtype == torch.int8 else 255
    with pytest.raises(ValueError, match="labels"):
        dual_partial_margin_loss(x, w[:10], y.to(dtype))
    y[2] = -1  # the default ignore_index, representable in the signed dtypes
    if dtype != torch.uint8:
        torch.testing.assert_close(
            dual_partial_margin_loss(x, w[:10], y.to(dtype)), dual_partial_margin_loss(x, w[:10], y)
        )


# --------------------------------------------------------------------------- higher-order gradients


def _literal_loss(x, w, y, scale, margin, margin_grad):
    """The loss written out in float64 autograd ops (all classes and dims, no ignored rows)."""
    cos = (F.normalize(x, dim=1, eps=1e-12) @ F.normalize(w, dim=1, eps=1e-12).T).clamp(-1.0, 1.0)
    c_t = cos.gather(1, y[:, None]).squeeze(1)
    z_t = margined_target_logit(c_t, scale, margin, "arcface")
    if margin_grad == "straight_through":  # value with margin, slope as if none
        z_t = scale * c_t + (z_t - scale * c_t).detach()
    logits = (scale * cos).scatter(1, y[:, None], z_t[:, None])
    return (torch.logsumexp(logits, dim=1) - z_t).mean()


def _gradient_penalty(loss_fn, x, w):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss = loss_fn(x, w)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + (g**2).sum()).backward()
    return x.grad, w.grad


@pytest.mark.parametrize("margin_grad", ["straight_through", "exact"])
def test_reference_backend_double_backward_is_exact(margin_grad):
    x, w, y = _inputs(dtype=torch.float64)
    kw = dict(scale=16.0, margin=0.3, margin_grad=margin_grad)
    got = _gradient_penalty(lambda a, b: dual_partial_margin_loss(a, b, y, backend="reference", **kw), x, w)
    expected = _gradient_penalty(lambda a, b: _literal_loss(a, b, y, **kw), x, w)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_backends_refuse_double_backward(backend):
    x, w, y = _inputs(dtype=_dtype(backend))
    with pytest.raises(RuntimeError, match="backend='reference'"):
        _gradient_penalty(lambda a, b: dual_partial_margin_loss(a, b, y, backend=backend), x, w)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_backends_allow_create_graph_without_second_backward(backend):
    """create_graph=True alone (no backward through the gradient) still gives the first-order gradient."""
    x, w, y = _inputs(dtype=_dtype(backend))
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(dual_partial_margin_loss(xg, w, y, backend=backend), xg, create_graph=True)
    xr = x.clone().requires_grad_()
    dual_partial_margin_loss(xr, w, y, backend="reference").backward()
    torch.testing.assert_close(g.detach(), xr.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- NaN and inf reach the loss


def _poisoned(kind: str, dtype):
    x, w, y = _inputs(dtype=dtype)
    if kind == "nan_prototype":
        w[y[1], 3] = math.nan
    elif kind == "nan_negative_prototype":
        w[[c for c in range(C) if c not in y.tolist()][0], 0] = math.nan
    elif kind == "inf_prototype":
        w[5, 2] = math.inf
    else:
        x[2, 1] = math.nan if kind == "nan_embedding" else math.inf
    return x, w, y


KINDS = ["nan_prototype", "nan_negative_prototype", "inf_prototype", "nan_embedding", "inf_embedding"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_non_finite_inputs_give_a_nan_loss(kind, backend, compute):
    x, w, y = _poisoned(kind, torch.float32)
    loss = dual_partial_margin_loss(x.to(compute), w, y, backend=backend, check_values=False)
    assert loss.isnan(), f"{backend} returned {loss.item()} for {kind}"


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_inputs_give_nan_statistics_in_the_triton_kernels(kind):
    """The per-row statistics of the model-parallel path, straight from the kernels."""
    from unicom_kernels.ops import triton_op

    x, w, y = _poisoned(kind, torch.float32)
    kw = dict(scale=32.0, margin=0.3, margin_type="arcface", margin_grad="straight_through")
    lse, z_t = triton_op.lse_and_target(x, w, y, compute_dtype=torch.float32, **kw)
    ref_lse, ref_z = reference.lse_and_target(x, w, y, compute_dtype=torch.float32, **kw)
    torch.testing.assert_close(lse.isnan(), ref_lse.isnan())
    torch.testing.assert_close(z_t.isnan(), ref_z.isnan())
    assert lse.isnan().any()


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_ignored_rows_change_nothing(value, backend):
    """Without the value checks an ignored row may be garbage (padding): it must not reach the
    prototypes' gradient through its zero weight (0 * NaN). Loss and gradients equal those with
    the row zeroed, bitwise, and the row's own gradient is 0."""
    x, w, y = _inputs(dtype=_dtype(backend))
    y[[1, 4]] = -1
    results = []
    for fill in (value, 0.0):
        xs, ws = x.clone(), w.clone()
        xs[1], xs[4, 2] = fill, fill
        xs.requires_grad_(), ws.requires_grad_()
        loss = dual_partial_margin_loss(xs, ws, y, backend=backend, check_values=False)
        loss.backward()
        results.append((loss.detach(), xs.grad, ws.grad))
    (loss, gx, gw), (loss0, gx0, gw0) = results
    assert torch.isfinite(loss) and torch.isfinite(gw).all() and torch.isfinite(gx).all()
    assert torch.equal(loss, loss0) and torch.equal(gx, gx0) and torch.equal(gw, gw0)
    assert not gx[[1, 4]].any()


def _scenario_non_finite_padding(rank, world, group):
    x, y, w = _rank_inputs(rank)
    y[0] = -1
    out = {}
    for fill in (math.nan, 0.0):
        crit = DualPartialMarginLoss(RC, D, process_group=group, check_values=False, class_sample_rate=1.0)
        with torch.no_grad():
            crit.weight.copy_(w)
        xs = x.clone()
        xs[0] = fill
        xs.requires_grad_()
        loss = crit(xs, y)
        loss.backward()
        out[str(fill)] = (loss.detach(), xs.grad, crit.weight.grad)
    return out


def test_non_finite_ignored_rows_change_nothing_across_ranks(tmp_path):
    for out in spawn(2, _scenario_non_finite_padding, tmp_path):
        for got, zeroed in zip(out["nan"], out["0.0"], strict=True):
            assert torch.isfinite(got).all() and torch.equal(got, zeroed)


# --------------------------------------------------------------------------- argument types


def test_generator_of_the_wrong_type_is_named():
    x, w, y = _inputs()
    for rate in (dict(class_sample_rate=0.5), dict(dim_sample_rate=0.5)):
        with pytest.raises(TypeError, match="generator"):
            dual_partial_margin_loss(x, w, y, generator="seed", **rate)


def test_numpy_integers_are_accepted():
    x, w, y = _inputs()
    crit = DualPartialMarginLoss(np.int64(C), np.int32(D), num_dims=np.int64(6), seed=np.int64(3))
    assert crit.num_classes == C and type(crit.num_classes) is int and crit.weight.shape == (C, D)
    crit(x, y)
    expected = dual_partial_margin_loss(x, w, y)
    torch.testing.assert_close(dual_partial_margin_loss(x, w, y, ignore_index=np.int64(-1)), expected)


@pytest.mark.parametrize("value", [2**70, -(2**64)])
def test_ignore_index_outside_int64_is_named(value):
    x, w, y = _inputs()
    with pytest.raises(ValueError, match="ignore_index"):
        dual_partial_margin_loss(x, w, y, ignore_index=value)
    with pytest.raises(ValueError, match="ignore_index"):
        DualPartialMarginLoss(C, D, ignore_index=value)


# --------------------------------------------------------------------------- across ranks

RB = 4  # rows per rank
RC = 10  # classes


def _rank_inputs(rank: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * RB, D, generator=gen, dtype=dtype)
    y = torch.randint(0, RC, (2 * RB,), generator=gen)
    w = torch.randn(RC, D, generator=gen, dtype=dtype)
    start, stop = class_range(RC, rank, 2)
    return x[rank * RB : (rank + 1) * RB], y[rank * RB : (rank + 1) * RB], w[start:stop]


def _outcome(call) -> dict:
    """What ``call()`` did on this rank and how long it took."""
    began = time.monotonic()
    try:
        value = call()
        return {"error": None, "value": value, "seconds": time.monotonic() - began}
    except Exception as exc:  # every kind: the point is that none of them hangs another rank
        return {"error": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - began}


def _broken(rank: int, where: str):
    """A stand-in for ``where`` that fails (AttributeError, a kind no check expects) on rank 1 only."""
    original = getattr(loss_module, where)

    def fail_on_rank_1(*args, **kwargs):
        if rank == 1:
            raise AttributeError(f"{where} failed on purpose")
        return original(*args, **kwargs)

    return original, fail_on_rank_1


# Every stage of the sharded loss that runs local code before a collective.
STAGES = ("_check_tensors", "sample_dims", "sample_classes")


def _scenario_one_rank_fails(rank, world, group):
    x, y, w = _rank_inputs(rank)
    out = {}
    for stage in STAGES:
        original, broken = _broken(rank, stage)
        setattr(loss_module, stage, broken)
        try:
            out[stage] = _outcome(
                lambda: dual_partial_margin_loss(
                    x,
                    w,
                    y,
                    process_group=group,
                    class_sample_rate=0.5,
                    dim_sample_rate=0.5,
                    generator=torch.Generator().manual_seed(7),  # the same dims on both ranks
                )
            )
        finally:
            setattr(loss_module, stage, original)
    out["options"] = _outcome(
        lambda: dual_partial_margin_loss(x, w, y, process_group=group, margin_type="sphereface" if rank else "arcface")
    )
    gen = torch.Generator().manual_seed(1)
    out["generator"] = _outcome(
        lambda: dual_partial_margin_loss(
            x, w, y, process_group=group, class_sample_rate=0.5, generator="seed" if rank == 1 else gen
        )
    )
    out["ok"] = _outcome(lambda: dual_partial_margin_loss(x, w, y, process_group=group))
    return out


def test_one_rank_failing_in_any_stage_fails_every_rank_quickly(tmp_path):
    results = spawn(2, _scenario_one_rank_fails, tmp_path, collective_timeout_s=60)
    for case in (*STAGES, "options", "generator"):
        for r, res in enumerate(results):
            got = res[case]
            assert got["error"] is not None, f"{case}: rank {r} did not raise"
            assert got["seconds"] < 20, f"{case}: rank {r} needed {got['seconds']:.1f}s to fail"
        expected = {"generator": "TypeError", "options": "ValueError"}.get(case, "AttributeError")
        assert results[1][case]["error"] == expected
        assert "rank 1" in results[0][case]["message"], results[0][case]["message"]
    assert "generator" in results[1]["generator"]["message"]
    assert results[0]["ok"]["error"] is None and results[1]["ok"]["error"] is None


def _scenario_mismatches(rank, world, group):
    x, y, w = _rank_inputs(rank)
    y8 = y.clone()
    y8[0] = 255  # out of range for 10 classes; 255 is what -1 becomes in uint8

    def train_vs_eval():
        crit = DualPartialMarginLoss(RC, D, process_group=group)
        if rank == 1:
            crit.eval()
        return crit(x, y)

    def double_backward():
        xg = x.double().requires_grad_()
        loss = dual_partial_margin_loss(xg, w.double(), y, process_group=group, backend="reference")
        (g,) = torch.autograd.grad(loss, xg, create_graph=True)
        (loss + (g**2).sum()).backward()

    cases = {
        "double_backward": double_backward,
        "margin": lambda: dual_partial_margin_loss(x, w, y, process_group=group, margin=0.3 + 0.1 * rank),
        "num_classes": lambda: DualPartialMarginLoss(RC + 2 * rank, D, process_group=group)(x, y),
        "training": train_vs_eval,
        "embeddings_dtype": lambda: dual_partial_margin_loss(x.double() if rank == 1 else x, w, y, process_group=group),
        "prototypes_dtype": lambda: dual_partial_margin_loss(x, w.double() if rank == 1 else w, y, process_group=group),
        "uint8_out_of_range": lambda: dual_partial_margin_loss(x, w, y8.to(torch.uint8), process_group=group),
        "uint64_beyond_int64": lambda: dual_partial_margin_loss(
            x, w, torch.where(torch.arange(len(y)) == 0, -1, y).to(torch.uint64), process_group=group
        ),  # -1 in uint64 is 2^64 - 1: a label, not the ignore_index
        "uint8": lambda: dual_partial_margin_loss(x, w, y.to(torch.uint8), process_group=group),
        "int64": lambda: dual_partial_margin_loss(x, w, y, process_group=group),
    }
    return {name: _outcome(case) for name, case in cases.items()}


def test_mismatches_across_ranks_are_named(tmp_path):
    results = spawn(2, _scenario_mismatches, tmp_path)
    needles = {
        "double_backward": ["process_group", "backend='reference'"],
        "margin": ["margin", "0.3", "0.4"],
        "num_classes": ["num_classes", "10", "12"],
        "training": ["training", "True", "False"],
        "embeddings_dtype": ["embeddings", "torch.float32", "torch.float64"],
        "prototypes_dtype": ["prototypes", "torch.float32", "torch.float64"],
        "uint8_out_of_range": ["labels", "255"],
        "uint64_beyond_int64": ["labels", "9223372036854775807 or more"],
    }
    for case, words in needles.items():
        for r, res in enumerate(results):
            got = res[case]
            assert got["error"] is not None, f"{case}: rank {r} did not raise"
            for word in words:
                assert word in got["message"], f"{case}: rank {r}: {got['message']}"
    for res in results:
        assert res["uint8"]["error"] is None and res["int64"]["error"] is None
        torch.testing.assert_close(res["uint8"]["value"], res["int64"]["value"], rtol=0, atol=0)
