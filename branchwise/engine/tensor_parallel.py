"""Tensor parallelism over torch.distributed: rank 0 runs everything, ranks 1.. run the target's forward.

The engine's process is rank 0 and starts the other ranks itself (`start`). transformers' tp plan shards the
target at load: each rank keeps whole heads of q/k/v and a slice of gate/up (split by output) and the matching
slices of o/down (split by input), as plain tensors; the fused layers sum the partial o/down outputs with one
all-reduce each (`models/fused.py`). Every step rank 0 sends the packed batch to the other ranks (one
broadcast on a gloo group, NCCL or gloo carries the all-reduces) and each runs the same decoder forward over
its own shard of the paged K/V cache (its KV heads). The output head is whole on rank 0 only: logits,
sampling, the scheduler and every strategy's own model (draft model, MTP module, Medusa and EAGLE-3 heads)
run there, over the gathered hidden states. Every copy, move and swap of K/V in the target's pool is sent
to every rank too (`ShardedBlocks`).

    rank 0:  schedule -> pack -> send("decode", packed) -> decoder (2 all-reduces a layer) -> logits
    rank r:                      recv ----------------> decoder (2 all-reduces a layer)
"""

from __future__ import annotations

import atexit
import fnmatch
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from branchwise.engine.kv_cache import BlockManager, new_pool
from branchwise.engine.model_runner import ModelRunner, Packed
from branchwise.models.fused import FUSED_ARCHITECTURES

log = logging.getLogger(__name__)


def check(config, size: int) -> None:
    """A clear start-up error where the model cannot be split `size` ways (before any rank starts)."""
    if not getattr(config, "base_model_tp_plan", None):
        raise ValueError(f"{config.model_type!r} has no tensor-parallel plan in transformers")
    if config.model_type not in FUSED_ARCHITECTURES:
        raise ValueError(
            f"tensor parallel runs the fused layers of {', '.join(sorted(FUSED_ARCHITECTURES))}; "
            f"{config.model_type!r} is not one of them"
        )
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for name, n in [
        ("num_attention_heads", config.num_attention_heads),
        ("num_key_value_heads", kv_heads),
        ("intermediate_size", config.intermediate_size),
    ]:
        if n % size:
            raise ValueError(f"tensor_parallel_size {size} does not divide the model's {name} ({n})")


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' partial outputs in place."""
    dist.all_reduce(x)
    return x


def local_shards(model: torch.nn.Module) -> None:
    """Replace the DTensors transformers' tp plan made with plain tensors: this rank's shard of the
    column- and row-split projections (our fused layers call the GEMMs and all-reduces themselves), the
    rest whole (the embedding; the output head, on rank 0 only)."""
    rank = dist.get_rank()
    plan = model.tp_plan
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        module.__dict__.pop("forward", None)  # the plan's forward wrappers: our layers do their work
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatch(name, pattern)), None)
        for key, p in list(module.named_parameters(recurse=False)):
            if isinstance(p, DTensor):  # the same modules in the same order on every rank: collectives pair
                local = p.to_local() if style in ("colwise", "rowwise") else p.full_tensor()
                setattr(module, key, torch.nn.Parameter(local, requires_grad=False))
        if style == "rowwise" and rank and getattr(module, "bias", None) is not None:
            module.bias.data.zero_()  # added once: by rank 0, before the sum
    if rank:  # logits are rank 0's
        head.weight = torch.nn.Parameter(head.weight.new_empty(0), requires_grad=False)


class Ranks:
    """Rank 0's handle on the other ranks: send them a command, collect their answers, stop them."""

    def __init__(self, size: int, group, processes: list, threads: int) -> None:
        self.size, self.group, self.processes = size, group, processes
        self.threads = threads  # rank 0's torch threads before it shared the cores
        self.closed = False
        atexit.register(self.close)

    @property
    def alive(self) -> bool:
        """Every other rank still runs (/health reports 503 once one has exited)."""
        return all(p.poll() is None for p in self.processes)

    def send(self, *command) -> None:
        dist.broadcast_object_list([command], src=0, group=self.group)

    def collect(self) -> list:
        """Each other rank's answer to the last command, in rank order."""
        answers = [None] * self.size
        dist.gather_object(None, answers, dst=0, group=self.group)
        return answers[1:]

    def close(self) -> None:
        """Stop every rank and wait for it to exit."""
        if self.closed:
            return
        self.closed = True
        try:
            self.send("stop")
        except Exception:  # a rank already gone: the others are ended below
            log.exception("could not tell the tensor-parallel ranks to stop")
        for p in self.processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        dist.destroy_process_group()
        torch.set_num_threads(self.threads)


def shard_of(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's KV heads of K/V laid out (..., kv_heads, head_dim)."""
    return full.chunk(size, dim=-2)[rank]


class ShardedBlocks(BlockManager):
    """Rank 0's block manager: data movement in the target's pool (pool 0, K/V heads split over the ranks)
    happens on every rank; what is read comes back whole (all heads), what is written is split again."""

    def __init__(self, num_blocks: int, block_size: int, ranks: Ranks) -> None:
        super().__init__(num_blocks, block_size)
        self.ranks = ranks

    def _whole(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        parts = [local[0].cpu(), *self.ranks.collect()]
        return [torch.cat(parts, dim=-2).to(local[0].device), *local[1:]]

    def _split(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        return [shard_of(data[0], 0, self.ranks.size), *data[1:]]

    def copy_block(self, src: int, dst: int) -> None:
        self.ranks.send("copy_block", src, dst)
        super().copy_block(src, dst)

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.ranks.send("move_slots", src.cpu(), dst.cpu())
        super().move_slots(src, dst)

    def gather(self, slots: list[int], device: torch.device | str | None = None) -> list[torch.Tensor]:
        self.ranks.send("gather", slots)
        return self._whole(super().gather(slots, device))

    def scatter(self, slots: list[int], data: list[torch.Tensor]) -> None:
        self.ranks.send("scatter", slots, data[0].cpu())
        super().scatter(slots, self._split(data))

    def read_blocks(self, blocks: list[int]) -> list[torch.Tensor]:
        self.ranks.send("read_blocks", blocks)
        return self._whole(super().read_blocks(blocks))

    def write_blocks(self, blocks: list[int], data: list[torch.Tensor]) -> None:
        self.ranks.send("write_blocks", blocks, data[0].cpu())
        super().write_blocks(blocks, self._split(data))


class ShardedRunner(ModelRunner):
    """Rank 0's runner of the target: each forward's packed batch goes to every rank first."""

    def __init__(self, model, pool, block_size, device, ranks: Ranks) -> None:
        super().__init__(model, pool, block_size, device)
        self.ranks = ranks

    def decode(self, packed: Packed, fill=None) -> torch.Tensor:
        assert fill is None, "async scheduling is not supported with tensor parallelism (refused at start)"
        self.ranks.send("decode", packed)
        return super().decode(packed)

    def capture_graphs(self, max_tokens: int, max_blocks_per_seq: int) -> None:
        """Every rank captures the same buckets at once (so the all-reduces in the warm-up and capture
        forwards pair up); replays stay paired because each rank picks graph or eager from the same packed
        batch. CUDA only, as for one rank."""
        self.ranks.send("capture_graphs", max_tokens, max_blocks_per_seq)
        super().capture_graphs(max_tokens, max_blocks_per_seq)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, size: int, port: int, device: torch.device):
    """Join the process group; returns the gloo group commands travel on."""
    os.environ["LOCAL_RANK"] = str(rank)  # transformers binds each rank's device from it
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    else:  # the ranks share the host's cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // size))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    return dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD


def start(config, size: int, model_path: str, dtype: torch.dtype, device: torch.device) -> Ranks:
    """Start ranks 1..size-1 (processes of their own: `python -m` this module) and join them as rank 0."""
    check(config, size)
    port = _free_port()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                __name__,
                str(rank),
                str(size),
                str(port),
                model_path,
                str(dtype)[6:],
                device.type,
            ]
        )
        for rank in range(1, size)
    ]
    threads = torch.get_num_threads()
    return Ranks(size, _join(0, size, port, device), processes, threads)


def _end_with_parent() -> None:
    """End this rank when rank 0's process is gone, however it went (it may be blocked in a collective)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


@torch.inference_mode()
def run_rank(rank: int, size: int, port: int, model_path: str, dtype: torch.dtype, device_type: str) -> None:
    """A rank other than 0: load its shard, then run what rank 0 sends until it says stop."""
    from branchwise.models.loader import kv_shape, load_model

    _end_with_parent()
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device(device_type)
    group = _join(rank, size, port, device)
    model = load_model(model_path, dtype, device, tensor_parallel=True)
    layers, kv_heads, head_dim = kv_shape(model)
    blocks, runner = None, None
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        command, *args = box[0]
        if command == "stop":
            break
        if command == "decode":
            runner.decode(*args)
        elif command == "init":  # the cache rank 0 sized
            num_blocks, block_size = args
            pool = new_pool(layers, num_blocks, block_size, kv_heads // size, head_dim, dtype, device)
            blocks = BlockManager(num_blocks, block_size)
            blocks.pools.append(pool)
            runner = ModelRunner(model, pool, block_size, device)
        elif command in ("gather", "read_blocks"):
            dist.gather_object(getattr(blocks, command)(*args)[0].cpu(), None, dst=0, group=group)
        elif command in ("scatter", "write_blocks"):
            where, whole = args
            getattr(blocks, command)(where, [shard_of(whole, rank, size)])
        elif command == "capture_graphs":
            runner.capture_graphs(*args)
        else:  # copy_block, move_slots
            getattr(blocks, command)(*args)
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, size, port, model_path, dtype_name, device_type = sys.argv[1:]
    run_rank(int(rank), int(size), int(port), model_path, getattr(torch, dtype_name), device_type)
