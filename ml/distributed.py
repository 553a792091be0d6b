"""Training under ``torchrun``: one process per device, DistributedDataParallel, rank 0 leads.

``torchrun --nproc-per-node N ...`` starts N copies of a command and tells each its place in its
environment: ``WORLD_SIZE`` (how many processes, over every node), ``RANK`` (which, 0..N-1),
``LOCAL_RANK`` (which on this node: its GPU) and where to meet (``MASTER_ADDR``/``MASTER_PORT``).
Without them, or with ``WORLD_SIZE=1``, nothing here does anything: one process trains as it
always did, with the same results.

Launched so, ``led_by_rank_zero(job, device=...)`` opens the process group (NCCL when training
runs on GPUs, each rank on the GPU of its ``LOCAL_RANK``; gloo on the CPU) and a second, gloo
group through which rank 0 sends the others Python objects (pickled: the processes of one
launch trust each other). Its timeout is long because the others wait there while rank 0 alone
reads and writes the database, which may take longer than NCCL's ten minutes.

Rank 0 runs the job: it alone takes locks, reads and writes the database, writes checkpoints and
files. Its collective steps (training) go through ``lead(work, **local)``: the other ranks run
``work()`` with it. At the end they return rank 0's result, or raise its error, so that every
process exits with the same code. An error inside a collective step is not relayed (the others
are stuck in that step's collectives): the process exits and torchrun stops the others.

Data: each global batch of the one-process loader is cut into equal slices, one per rank
(``RankBatches``), so that the ranks together take the same optimizer steps on the same batches
as one process would; DDP averages the gradients.
"""

from __future__ import annotations

import itertools
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

T = TypeVar("T")

# How long the other ranks wait for rank 0 (its database work between training runs: rescoring
# the active model, re-tagging, model priors, mask quality).
LEADER_WAIT = timedelta(hours=12)


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int  # over every node; 0 leads
    local_rank: int  # on this node: the GPU it uses
    world_size: int


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The torchrun launch described by the environment; None for a process on its own (no
    ``WORLD_SIZE``, or ``WORLD_SIZE=1``)."""
    env = os.environ if environ is None else environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    return Launch(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), world_size)


def backend_for(device: str | torch.device) -> str:
    """NCCL when training runs on GPUs (``cuda``, or ``auto`` with a GPU), else gloo."""
    if str(device) == "auto":
        on_gpu = torch.cuda.is_available()
    else:
        on_gpu = torch.device(device).type == "cuda"
    return "nccl" if on_gpu else "gloo"


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, ``cuda`` is the GPU of this process's ``LOCAL_RANK``; else ``device``."""
    launch = launch_from_env()
    if launch is None or device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", launch.local_rank)


def world_size() -> int:
    """Processes training together: the process group's size, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    launch = launch_from_env()
    return 0 if launch is None else launch.rank


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes), or alone."""
    return rank() == 0


@dataclass
class _State:
    control: dist.ProcessGroup | None = None  # gloo, LEADER_WAIT: rank 0's objects
    leading: bool = False  # rank 0 inside led_by_rank_zero
    stranded: bool = False  # an error left a collective step: the others may be stuck in it


_state = _State()


@contextmanager
def joined(device: str | torch.device) -> Iterator[None]:
    """Open the process group of a torchrun launch for the body, and close it after; nothing
    when not launched by torchrun or when a group is already open."""
    launch = launch_from_env()
    if launch is None or dist.is_initialized():
        yield
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(backend)
    control = dist.new_group(backend="gloo", timeout=LEADER_WAIT)
    assert isinstance(control, dist.ProcessGroup)  # every rank is a member
    _state.control = control
    try:
        yield
    except Exception:
        if not _state.stranded:  # the others are where this rank is: close together
            _close()
        _state.control, _state.stranded = None, False  # else this process ends, torchrun the others
        raise
    _close()


def _close() -> None:
    dist.barrier(group=_state.control)  # rank 0's last object has reached everyone
    dist.destroy_process_group()
    _state.control, _state.stranded = None, False


def led_by_rank_zero(job: Callable[[], T], *, device: str | torch.device) -> T:
    """Run ``job`` on rank 0 while the other ranks follow it (``follow``); every rank returns
    rank 0's result or raises its error. Not launched by torchrun, or nested in another
    ``led_by_rank_zero`` (a retrain's training jobs): ``job()``.

    ``job``'s collective steps must go through ``lead``; its result and errors must pickle (an
    error that does not is relayed as a ``RuntimeError`` with its message).
    """
    if _state.leading:
        return job()
    with joined(device):
        if world_size() == 1:
            return job()
        if not is_main():
            return follow()
        _state.leading = True
        try:
            result = job()
            pickle.dumps(result)  # else it would fail on the way, the others waiting for it
        except Exception as exc:
            if not _state.stranded:
                _send(_Failed(_portable(exc)))
            raise
        finally:
            _state.leading = False
        _send(_Done(result))
        return result


def lead(work: Callable[..., T], **local: Any) -> T:
    """A collective step of rank 0's job: the other ranks run ``work()`` while rank 0 runs
    ``work(**local)`` (``local``: what only rank 0 has, e.g. the model it starts from or its
    progress hook). Outside ``led_by_rank_zero``: ``work(**local)``.

    ``work`` must pickle: a module-level function, or a ``functools.partial`` of one."""
    if not _state.leading:
        return work(**local)
    _send(_Work(work))
    try:
        return work(**local)
    except BaseException:
        _state.stranded = True
        raise


def follow() -> Any:
    """The other ranks' side of ``led_by_rank_zero``: run each work rank 0 sends until it sends
    its result (returned) or its error (raised)."""
    while True:
        message = _receive()
        if isinstance(message, _Failed):
            raise message.error
        if isinstance(message, _Done):
            return message.value
        try:
            message.work()
        except BaseException:
            _state.stranded = True
            raise


def from_rank_zero(make: Callable[[], T]) -> T:
    """``make()`` computed on rank 0 and given to every rank (e.g. scores on the evaluation set,
    which then are exactly those of one process); alone: ``make()``."""
    if world_size() == 1:
        return make()
    box: list[Any] = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_state.control)
    return box[0]


def parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel: rank 0's weights copied to every rank at once,
    gradients averaged over the ranks at each backward; alone: ``model`` itself."""
    if world_size() == 1:
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def mean(value: Tensor) -> Tensor:
    """The mean of ``value`` over the ranks (e.g. a step's loss, for the log); alone: itself."""
    if world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


class RankBatches(Sampler[list[int]]):
    """This rank's slice of each global batch of ``batches`` (the one-process loader's).

    Each batch is cut into ``world_size`` contiguous slices of ``ceil(len(batch) / world_size)``
    indices; one that does not divide is padded with its own first indices (as
    ``DistributedSampler`` pads the data), so every rank takes as many batches, of the same
    sizes: DDP needs that. With a batch size that divides, the ranks together see exactly the
    one-process batches, in the same order.
    """

    def __init__(self, batches: Sampler[list[int]], *, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        assert isinstance(self.batches, Sized)
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            per = -(-len(batch) // self.world_size)
            padded = list(itertools.islice(itertools.cycle(batch), per * self.world_size))
            yield padded[self.rank * per : (self.rank + 1) * per]


@dataclass(frozen=True)
class _Work:
    work: Callable[[], Any]


@dataclass(frozen=True)
class _Done:
    value: Any


@dataclass(frozen=True)
class _Failed:
    error: Exception


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling, else a ``RuntimeError`` saying the same."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _send(message: _Work | _Done | _Failed) -> None:
    dist.broadcast_object_list([message], src=0, group=_state.control)


def _receive() -> _Work | _Done | _Failed:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=_state.control)
    return box[0]
