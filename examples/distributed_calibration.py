"""Calibrate a mixprec sim with several processes (or GPUs) and torch.distributed.

Each rank builds the same sim, runs ``compute_encodings`` on its shard of the calibration data,
and mixprec combines the statistics of every quantizer across ranks: all ranks end with the
encodings a single process would compute over all the data, bit for bit.

Run on CPU (gloo) or one GPU per process (NCCL):

    torchrun --nproc-per-node 2 examples/distributed_calibration.py
    torchrun --nproc-per-node 2 examples/distributed_calibration.py --ddp --scheme percentile

See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import inspect
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset, TensorDataset

import mixprec


class SmallNet(nn.Module):
    """Stands in for your model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def build_model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank (or load one checkpoint everywhere)
    return SmallNet().eval()


def calibration_data(n: int = 64) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)  # stands in for your calibration set
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=gen))


def no_buffer_sync() -> dict[str, bool]:
    """DDP keyword turning off the buffer broadcast in forward (renamed in newer torch)."""
    params = inspect.signature(DistributedDataParallel).parameters
    return (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="tf_enhanced", choices=["tf", "tf_enhanced", "percentile"])
    parser.add_argument("--ddp", action="store_true", help="run the forward passes through DDP")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)  # NCCL collectives use the current device
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()

    model = build_model().to(device)
    dataset = calibration_data()
    dummy = dataset[0][0][None].to(device)
    sim = mixprec.QuantizationSimModel(model, dummy_input=dummy, quant_scheme=args.scheme)

    # A disjoint shard per rank: the union is the whole set, no sample twice (DistributedSampler
    # pads with repeated samples, which would count them twice in the histograms).
    shard = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=args.batch_size)

    # Calibration needs no gradients and no DDP: the plain sim.model is enough. With DDP, wrap once
    # and turn off the buffer broadcast in forward (a collective each batch, which would also make
    # shards of different lengths hang).
    runner = DistributedDataParallel(sim.model, **no_buffer_sync()) if args.ddp else None

    def forward_pass(model: nn.Module, _: object) -> None:
        net = runner or model
        for (x,) in loader:
            net(x.to(device))

    sim.compute_encodings(forward_pass, None)

    # every rank holds the same encodings: check it with one all-gather of a checksum
    checksum = torch.stack(
        [q.get_encoding().scale.double().sum() for _, q in sim.quantizers() if q.needs_encoding]
    ).sum()
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if rank == 0:
        same = all(bool(s == sums[0]) for s in sums)
        print(f"{world} ranks, {len(dataset)} samples, scheme {args.scheme}: encodings identical: {same}")
        for _, q in list(sim.quantizers())[:4]:
            print(f"  {q.label}: scale {q.get_encoding().scale.tolist()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
