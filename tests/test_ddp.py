"""A sharded loss inside the module wrapped by DistributedDataParallel (gloo on CPU).

With :func:`exclude_shards_from_ddp` one DDP + SGD step equals one single-process step on the
global batch, whether or not the class count is divisible by the world size; without it DDP
replicates and averages the shards (rank 0's block everywhere), which trains wrong.
"""

from __future__ import annotations

import pytest
import torch
from ranks import spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unicom_kernels import DualPartialMarginLoss, class_range, dual_partial_margin_loss, exclude_shards_from_ddp

D_IN, D, B, WORLD = 12, 16, 5, 2
CASES = [(10, True), (11, True), (10, False)]  # (classes, exclude_shards_from_ddp called)


class _Model(nn.Module):
    """Backbone and loss in one module: ``model(inputs [B, D_IN], labels [B]) -> 0-dim loss``."""

    def __init__(self, num_classes: int, process_group=None) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same backbone on every rank and in the reference
        self.backbone = nn.Sequential(nn.Linear(D_IN, 32), nn.Tanh(), nn.Linear(32, D))
        self.criterion = DualPartialMarginLoss(
            num_classes, D, class_sample_rate=0.5, dim_sample_rate=0.75, process_group=process_group
        )

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.backbone(inputs), labels)


def _data(num_classes: int):
    """Global batch ``[W * B, D_IN]`` fp32, labels ``[W * B]`` int64 and prototypes ``[C, D]`` fp32."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(WORLD * B, D_IN, generator=gen)
    labels = torch.randint(0, num_classes, (WORLD * B,), generator=gen)
    return inputs, labels, 0.01 * torch.randn(num_classes, D, generator=gen)


def _scenario(rank, world, group):
    model = _Model(10, group)
    model._ddp_params_and_buffers_to_ignore = ["backbone.0.bias"]  # set by the user: kept
    assert exclude_shards_from_ddp(model) == ["criterion.weight", "criterion._step"]
    assert model._ddp_params_and_buffers_to_ignore == ["backbone.0.bias", "criterion.weight", "criterion._step"]
    out = []
    for num_classes, exclude in CASES:
        inputs, labels, protos = _data(num_classes)
        start, stop = class_range(num_classes, rank, world)
        model = _Model(num_classes, group)
        with torch.no_grad():
            model.criterion.weight.copy_(protos[start:stop])
        names = exclude_shards_from_ddp(model) if exclude else []
        if exclude:
            assert exclude_shards_from_ddp(model) == names  # a second call changes nothing
            assert model._ddp_params_and_buffers_to_ignore == names
        ddp = DistributedDataParallel(model, process_group=group)
        if exclude:
            with pytest.raises(TypeError, match="before DistributedDataParallel"):
                exclude_shards_from_ddp(ddp)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        rows = slice(rank * B, (rank + 1) * B)
        loss = ddp(inputs[rows], labels[rows])
        loss.backward()
        opt.step()
        out.append(
            {
                "names": names,
                "loss": loss.detach(),
                "backbone": {k: v.detach().clone() for k, v in model.backbone.state_dict().items()},
                "shard": model.criterion.weight.detach().clone(),
                "class_index": model.criterion.last_class_index,
                "dim_index": model.criterion.last_dim_index,
            }
        )
    return {"cases": out}


def _reference_step(num_classes: int, class_index: torch.Tensor, dim_index: torch.Tensor | None):
    """One SGD step of the same model in one process on the global batch and the ranks' selection."""
    inputs, labels, protos = _data(num_classes)
    model = _Model(num_classes)
    protos = nn.Parameter(protos)
    opt = torch.optim.SGD([*model.backbone.parameters(), protos], lr=0.5)
    loss = dual_partial_margin_loss(
        model.backbone(inputs), protos, labels, class_index=class_index, dim_index=dim_index
    )
    loss.backward()
    opt.step()
    return loss.detach(), model.backbone.state_dict(), protos.detach()


def test_sharded_loss_inside_ddp(tmp_path):
    results = spawn(WORLD, _scenario, tmp_path)
    for i, (num_classes, exclude) in enumerate(CASES):
        per_rank = [res["cases"][i] for res in results]
        class_index = torch.cat([got["class_index"] for got in per_rank])
        loss, backbone, protos = _reference_step(num_classes, class_index, per_rank[0]["dim_index"])
        shards_match = []
        for r, got in enumerate(per_rank):
            start, stop = class_range(num_classes, r, WORLD)
            shards_match.append(torch.allclose(got["shard"], protos[start:stop], rtol=1e-5, atol=1e-7))
            if not exclude:
                continue
            assert got["names"] == ["criterion.weight", "criterion._step"]
            torch.testing.assert_close(got["loss"], loss)
            for name, value in backbone.items():
                torch.testing.assert_close(got["backbone"][name], value, msg=f"rank {r}: {name} differs")
            torch.testing.assert_close(got["shard"], protos[start:stop], msg=f"rank {r}: shard differs")
        if not exclude:
            # DDP broadcast rank 0's block to rank 1 and averaged the two blocks' gradients.
            assert not any(shards_match), "DDP left the shards alone without exclude_shards_from_ddp"


def test_nothing_to_exclude_without_process_group():
    model = _Model(10)
    assert exclude_shards_from_ddp(model) == []
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")
