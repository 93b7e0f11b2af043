"""Model-parallel training with torchrun: a DDP backbone and a class-sharded DualPartialMarginLoss.

    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py          # one machine
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint HOST:29500 examples/train_distributed.py  # each node

NCCL on GPUs, gloo on CPU. Every rank holds 1/W of the prototypes; the backbone's
gradients are averaged by DDP, and the loss scales the embedding gradient so that this
equals one process training on the global batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from unicom_kernels import DualPartialMarginLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    # Synthetic data: every rank can generate the class centres; each draws its own batches.
    centres = torch.randn(args.classes, 32, generator=torch.Generator().manual_seed(0)).to(device)
    data_gen = torch.Generator(device=device).manual_seed(1 + rank)

    torch.manual_seed(0)  # identical backbone init on every rank (DDP also broadcasts it)
    backbone = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).to(device)
    backbone = torch.nn.parallel.DistributedDataParallel(backbone)
    criterion = DualPartialMarginLoss(
        args.classes, 64, class_sample_rate=0.2, dim_sample_rate=0.5, process_group=dist.group.WORLD, device=device
    )
    optimizer = torch.optim.AdamW(
        [{"params": backbone.parameters()}, {"params": criterion.parameters(), "weight_decay": 0.0}], lr=3e-3
    )
    start, stop = criterion.class_range
    print(f"rank {rank}/{world}: classes [{start}, {stop}), prototypes {tuple(criterion.weight.shape)}", flush=True)
    for step in range(args.steps):
        labels = torch.randint(0, args.classes, (args.batch,), generator=data_gen, device=device)
        inputs = centres[labels] + 0.3 * torch.randn(args.batch, 32, generator=data_gen, device=device)
        loss = criterion(backbone(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
