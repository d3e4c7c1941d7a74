"""The data-parallel workers' collective transport: a torch.distributed process group among the Ray actors
(NCCL between GPUs, gloo between CPU workers), for the two exchanges of each capture pass.

- `reduce_to_owners`: each rank that solves a unit (its owner, or every rank for a unit solved in row
  shares) receives every worker's partial Hessian, point to point, and sums them in worker order — the
  same additions, so the same bits, as the object-store transport, and at most two [in, in] matrices per
  unit on a solving rank (a gather would hold W).
- `broadcast_from_owners`: each rank's results (packed weights, row shares) go to every worker, rank by rank.

Every worker walks the same units in the same order, so the sends and receives always pair up.
"""

from __future__ import annotations

import datetime
import pickle
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

from quantizer.decoder import Unit
from quantizer.hessian import HessianAccumulator

TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting this long for a peer fails (the peer is gone)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rendezvous(host: str) -> tuple[dist.TCPStore, str]:
    """(Rank 0) the group's key-value store, listening on a port the OS picks on this node (picking a free port
    and binding it later lets another process take it in between), and its host:port for the others."""
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    return store, f"{host}:{store.port}"


def join(address: str, rank: int, world: int, device: torch.device, store: dist.TCPStore | None = None) -> None:
    """Join (or re-form, after a restart) the group of `world` workers whose rank 0 serves the store at `address`
    (rank 0 passes the `store` it made)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if store is None:
        host, _, port = address.rpartition(":")
        store = dist.TCPStore(host, int(port), is_master=False, timeout=TIMEOUT)
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world, timeout=TIMEOUT)


def barrier() -> None:
    dist.barrier()


def _transfers(accs: dict[Unit, HessianAccumulator], owners: dict[Unit, tuple[int, ...]]
               ) -> list[tuple[Unit, int]]:
    """(first unit holding an accumulator, solving rank) pairs, in the owners' order: units sharing an
    accumulator (MoE experts calibrated on the block input) move it once per solving rank."""
    first: dict[int, Unit] = {}
    pairs: list[tuple[Unit, int]] = []
    for unit, ranks in owners.items():
        for owner in ranks:
            key = (first.setdefault(id(accs[unit]), unit), owner)
            if key not in pairs:
                pairs.append(key)
    return pairs


def reduce_to_owners(accs: dict[Unit, HessianAccumulator], owners: dict[Unit, tuple[int, ...]], rank: int,
                     world: int) -> tuple[dict[Unit, HessianAccumulator], int]:
    """This worker's partials {unit: accumulator} → the sums of the units it solves (worker order), and the
    bytes it sent."""
    sums: dict[int, HessianAccumulator] = {}  # id(partial) → the sum this worker owns
    sent = 0
    transfers = _transfers(accs, owners)
    plan = [(key, owner, tuple(accs[key].xtx.shape)) for key, owner in transfers]
    plans: list[Any] = [None] * world
    dist.all_gather_object(plans, plan)
    if any(other != plan for other in plans):  # unpaired sends would wait for the timeout: refuse now
        raise RuntimeError("data-parallel workers disagree on the Hessians to exchange (their capture passes "
                           "differ); this is a bug in rayquant, please report it with the job file")
    moves = Counter(key for key, _ in transfers)  # an accumulator moved to several ranks stays unsummed
    for key, owner in transfers:
        acc = accs[key]
        count = torch.tensor([acc.count], dtype=torch.int64, device=acc.xtx.device)
        if rank != owner:
            dist.send(acc.xtx, owner)
            dist.send(count, owner)
            sent += acc.xtx.numel() * acc.xtx.element_size()  # (the 8-byte count is not counted)
            continue
        total: torch.Tensor | None = None
        tokens = 0
        for source in range(world):
            if source == rank:
                part, n = (acc.xtx.clone() if moves[key] > 1 and source == 0 else acc.xtx), acc.count
            else:
                part = torch.empty_like(acc.xtx)
                dist.recv(part, source)
                dist.recv(count, source)
                n = int(count.item())
            if total is None:
                total = part  # worker 0's partial is the base of the sum, as in reduce_in_order
            else:
                total += part
            tokens += n
        sums[id(acc)] = HessianAccumulator.from_sum(total, tokens)  # one transfer per accumulator and owner
    return {unit: sums[id(accs[unit])] for unit, ranks in owners.items() if rank in ranks}, sent


def broadcast_from_owners(output: Any, rank: int, world: int, device: torch.device) -> tuple[list[Any], int]:
    """Every worker's `output` (its units' results and row shares) to every worker, in rank order; returns
    the W outputs and the bytes this worker sent."""
    outputs: list[Any] = []
    sent = 0
    for owner in range(world):
        payload = [pickle.dumps(output) if owner == rank else None]
        size = torch.tensor([len(payload[0]) if owner == rank else 0], dtype=torch.int64, device=device)
        dist.broadcast(size, owner)
        buffer = (torch.frombuffer(bytearray(payload[0]), dtype=torch.uint8).to(device) if owner == rank
                  else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
        dist.broadcast(buffer, owner)
        if owner == rank:
            outputs.append(output)
            sent += int(size.item()) * (world - 1)
        else:
            outputs.append(pickle.loads(buffer.cpu().numpy().tobytes()))
    return outputs, sent
