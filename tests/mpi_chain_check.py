"""Run under mpiexec by test_parallel.py: the chain reduction alone on adversarial float32
values (large and small of both signs, negative zero), against one process's left-to-right
sum. Prints OK on rank 0 when every element is bitwise equal."""
import sys

import numpy as np

from cllm.parallel import ProcessGroup

SPHERES, SIZE = 6, 3 * (1 << 20) + 7   # more than one chain message, and a ragged last one


def sphere_gradients() -> np.ndarray:
    rng = np.random.default_rng(12)
    magnitude = 10.0 ** rng.integers(-30, 30, (SPHERES, SIZE))
    values = (rng.choice([-1.0, 1.0], (SPHERES, SIZE)) * magnitude).astype(np.float32)
    values[:, ::97] = -0.0
    values[1, ::89] = 3e38          # sums that overflow in one order and not in another
    values[2, ::89] = -3e38
    return values


group = ProcessGroup()
assert group.size > 1
g = sphere_gradients()
first, last = group.sphere_block(SPHERES)
out = np.empty(SIZE, np.float32)
with np.errstate(over="ignore", invalid="ignore"):
    group.chain_sum(g[first:last], out)
    expected = g[0].copy()
    for row in g[1:]:
        expected += row
    regrouped = g[0] + (g[1] + g[2]) + (g[3] + g[4] + g[5])
if group.rank == 0:
    if np.array_equal(regrouped.view(np.uint32), expected.view(np.uint32)):
        sys.exit("the values do not tell a regrouped sum from the left-to-right one")
    if not np.array_equal(out.view(np.uint32), expected.view(np.uint32)):
        sys.exit(f"chain sum differs from the left-to-right sum in "
                 f"{np.count_nonzero(out.view(np.uint32) != expected.view(np.uint32))} places")
    print("OK", flush=True)
