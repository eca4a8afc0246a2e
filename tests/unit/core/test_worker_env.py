"""The Ray Train workers' environment, and the glibc allocator settings CPU workers get (what they change)."""

import os
import subprocess
import sys

from raydist.core.runs import CPU_WORKER_MALLOC_ENV, train_worker_env

# A training step's pattern: the same big tensors (here 112 and 12 MiB) allocated and freed every step, in a
# thread other than the main one, as Ray Train runs the loop. Prints the minor page faults of 32 such steps
# after 3 warm-up steps.
_FAULTS = """
import resource, threading, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    a = torch.ones(28 * 2**20); b = torch.ones(3 * 2**20); del a, b
def loop():
    for _ in range(3):
        step()
    before = faults()
    for _ in range(32):
        step()
    print(faults() - before)
t = threading.Thread(target=loop)
t.start()
t.join()
"""


def _step_faults(extra_env: dict[str, str]) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _FAULTS], env={**env, **extra_env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_cpu_workers_keep_freed_memory_for_the_next_step():
    # glibc's default: each step's tensors are fresh mmaps, faulted in page by page (~29 Ki pages of 4 KiB a
    # step); with raydist's settings later steps mostly reuse the pages earlier steps freed.
    default, raydist = _step_faults({}), _step_faults(CPU_WORKER_MALLOC_ENV)
    assert default > 32 * 25_000
    assert raydist < default / 4, (default, raydist)


def test_worker_env_allocator_settings_on_cpu_only_and_the_users_env_wins():
    cpu = train_worker_env({}, on_gpu=False)
    assert cpu["TOKENIZERS_PARALLELISM"] == "false"
    assert all(cpu[k] == v for k, v in CPU_WORKER_MALLOC_ENV.items())
    assert not set(CPU_WORKER_MALLOC_ENV) & set(train_worker_env({}, on_gpu=True))
    mine = train_worker_env({"MALLOC_MMAP_MAX_": "65536", "FOO": "1"}, on_gpu=False)
    assert mine["MALLOC_MMAP_MAX_"] == "65536" and mine["FOO"] == "1"
