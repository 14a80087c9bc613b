"""The recursive level (CRYSTALLINE.md section 1): one training run over several processes and
machines, on MPI. Processes are the spheres of the next level: rank p owns a contiguous block
of the run's S spheres (sequence b still goes to sphere b mod S), and Node Zero of rank 0 is
the global Node Zero: it alone reads the data, draws the batches, evaluates, writes files and
prints; the other ranks receive what they need from it.

The gradient is the same, bit for bit, as one process's: the left-to-right sum over spheres
0..S-1. MPI's reductions do not promise a summation order, so the sum is ours, on
point-to-point messages: a chain in rank order where each rank adds its spheres' gradients,
left to right, to the running sum it receives from the previous rank, chunk by chunk (so the
ranks work on different chunks at once), and the last rank broadcasts the total. The loss sums
travel the same chain.

mpi4py is imported only when the process runs under MPI (world size above 1 in the launcher's
environment): a single-process run never loads it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np

from .errors import CllmError

# Where MPI launchers put the world size: MPICH (hydra, Slurm's pmi2, Intel MPI) and Open MPI.
_WORLD_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
CHUNK = 1 << 20            # floats of the gradient per chain message (4 MB)
_POLL_SECONDS = 0.002      # how often a rank waiting on Node Zero looks for its next message
STEP, STOP = 1, 0          # Node Zero's commands to the other ranks


def world_size() -> int:
    """The number of processes of the MPI job this process belongs to (1 outside MPI)."""
    for name in _WORLD_SIZE:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def sphere_blocks(spheres: int, processes: int) -> list[tuple[int, int]]:
    """(first, last) spheres of each rank: contiguous blocks in rank order, the first
    S mod processes ranks holding one more."""
    sizes = [spheres // processes + (p < spheres % processes) for p in range(processes)]
    return [(sum(sizes[:p]), sum(sizes[:p + 1])) for p in range(processes)]


class ProcessGroup:
    """This process's place in the MPI job, and the messages of a training run."""

    def __init__(self):
        from mpi4py import MPI
        self.mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._keep = np.zeros((0, 0), np.float32)

    def sphere_block(self, spheres: int) -> tuple[int, int]:
        """Spheres first..last-1 of S belong to this rank."""
        return sphere_blocks(spheres, self.size)[self.rank]

    def loss_and_grads(self, model, x, y, spheres: int, threads: int) -> tuple[float, float]:
        """(mean training loss, mean plain cross-entropy) of the batch, and its gradient in
        model.grad_flat on every rank: those of one process with the same S, bit for bit."""
        first, last = self.sphere_block(spheres)
        size = model.flat.size
        if self._keep.shape != (last - first, size):
            self._keep = np.zeros((last - first, size), np.float32)
        x, y = np.ascontiguousarray(x, np.int64), np.ascontiguousarray(y, np.int64)
        losses, n_targets = model.core.sphere_losses_and_grads(x, y, spheres, first, last,
                                                               threads, self._keep)
        mine = min(last, min(spheres, len(x))) - first   # spheres that hold sequences
        running = np.zeros(2)
        self.chain_sum(losses[first:first + mine], running)
        self.chain_sum(self._keep[:mine], model.grad_flat)
        return running[0] / n_targets, running[1] / n_targets

    def chain_sum(self, mine: np.ndarray, out: np.ndarray) -> None:
        """out <- the left-to-right sum of every rank's rows of `mine` (this rank's spheres,
        in order; rank 0's first row is sphere 0), on every rank: each rank adds its rows to
        the running sum of the ranks before it, chunk by chunk, and the last rank broadcasts
        the total. The same sums, element by element, as one process adding all the rows."""
        flat_out = out.reshape(-1)
        rows = mine.reshape(len(mine), flat_out.size)
        for lo in range(0, flat_out.size, CHUNK):
            part = flat_out[lo:lo + CHUNK]
            if self.rank == 0:
                part[...] = rows[0, lo:lo + CHUNK]
            else:
                self.comm.Recv(part, source=self.rank - 1)
            for row in rows[1 if self.rank == 0 else 0:]:
                part += row[lo:lo + CHUNK]
            if self.rank < self.size - 1:
                self.comm.Send(part, dest=self.rank + 1)
        self.comm.Bcast(out, root=self.size - 1)

    # ---- Node Zero's messages ----

    def share(self, value=None):
        """Node Zero's Python object, on every rank (pickled; small things only)."""
        header = np.zeros(1, np.int64)
        payload = None
        if self.rank == 0:
            import pickle
            payload = np.frombuffer(pickle.dumps(value), np.uint8)
            header[0] = payload.size
        self._wait(self.comm.Ibcast(header, root=0))
        if self.rank != 0:
            payload = np.empty(int(header[0]), np.uint8)
        self.comm.Bcast(payload, root=0)
        if self.rank == 0:
            return value
        import pickle
        return pickle.loads(payload.tobytes())

    def share_array(self, array: np.ndarray) -> None:
        """Node Zero's values of `array` (the same shape and dtype on every rank), in place."""
        self.comm.Bcast(array, root=0)

    def _wait(self, request) -> None:
        """Wait for a message from Node Zero without spinning a core: while it reads the
        corpus, evaluates or writes files, the other ranks sleep between looks."""
        while not request.Test():
            time.sleep(_POLL_SECONDS)

    def abort(self, code: int) -> None:
        """End the whole job: after an error on any rank, the others would wait forever."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


_released = False   # Node Zero has told the other ranks to end


def release(group: ProcessGroup) -> None:
    """Node Zero: tell the other ranks that training is over (they end cleanly)."""
    global _released
    group.share((STOP,))
    _released = True


def end_job_after_failure(code: int) -> None:
    """Called with the command's exit code: a rank that fails while the others still wait
    for it ends the whole job, which would otherwise hang."""
    if code != 0 and world_size() > 1 and not _released:
        ProcessGroup().abort(code)


# ---- launching ----

def launch(processes: int, argv: list[str], threads: int) -> int:
    """Run `cllm argv` (without --processes) as an MPI job of `processes` processes on this
    machine, through the environment's mpiexec; return its exit code."""
    mpiexec = shutil.which("mpiexec", path=os.pathsep.join(
        [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if mpiexec is None:
        raise CllmError("--processes needs MPI: install it with pip install 'cllm[mpi]' (the "
                        "mpich and mpi4py wheels), or put a system MPI's mpiexec on PATH")
    try:
        import mpi4py  # noqa: F401  (only to say so before starting N processes)
    except ImportError:
        raise CllmError("--processes needs mpi4py: pip install 'cllm[mpi]'") from None
    env = dict(os.environ)
    command = [mpiexec, "-n", str(processes)]
    if _is_open_mpi(mpiexec):
        command += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    cores = len(os.sched_getaffinity(0))
    if processes * max(threads, 1) > cores:
        # MPICH waits for messages by spinning; more processes than cores would then starve
        # the ones computing. Yield the core while waiting instead.
        env.setdefault("MPIR_CVAR_CH4_PROGRESS_THROTTLE", "1")
        env.setdefault("MPIR_CVAR_POLLS_BEFORE_YIELD", "1")
    # `python -m mpi4py` aborts the whole job if a rank dies of an unhandled exception
    command += [sys.executable, "-m", "mpi4py", "-m", "cllm", *argv]
    process = subprocess.Popen(command, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:   # the terminal sent SIGINT to every process of the group
        return process.wait()


def _is_open_mpi(mpiexec: str) -> bool:
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Open MPI" in out or "OpenRTE" in out


def without_processes_flag(argv: list[str]) -> list[str]:
    """argv without --processes N (or --processes=N)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out
