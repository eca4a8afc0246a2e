"""Ray 2.60 Train V2, minimal: a checkpoint every rank reported is lost when a worker dies before the
controller's next poll, and the restarted group starts from an older checkpoint (here: from scratch).

    .venv/bin/python scripts/ray_bugs/train_v2_checkpoint_lost_when_worker_dies.py

`ray.train.report(metrics, checkpoint=...)` persists the checkpoint, then puts the report in the worker's
result queue (``queue.Queue(maxsize=1)``, ray/train/v2/_internal/execution/context.py `_wait_then_report`)
and returns. The controller takes it from there only when it next polls the workers (every
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default), and registers the checkpoint only once it has the
report of every rank. A rank that dies inside that window takes its queued report with it: the checkpoint
directory is on storage but never registered, so `ray.train.get_checkpoint()` after the restart returns an
older checkpoint (or None) and the work since then is redone.

Here: 2 workers report a checkpoint at step 1, then rank 1 exits at once (as if its node died); with
``FailureConfig(max_failures=1)`` Ray Train restarts the group, which finds no checkpoint.

How raydist lives with it: nothing to fix in raydist (the resumed run is still correct, only older); the
fault-drill test (tests/integration/test_multinode.py) kills a rank only after a later report of that rank
was accepted (the queue holds one report, so a second `report` returns only after the first was taken).
Prints what it found and exits 0 when the bug shows, 1 when it does not (e.g. fixed in a later Ray).
"""

import os
import sys
import tempfile

import ray


def train_fn(config):
    import ray.train

    ckpt = ray.train.get_checkpoint()
    rank = ray.train.get_context().get_world_rank()
    if ckpt is not None or os.path.exists(config["marker"]):
        if rank == 0:
            with open(config["result"], "w") as f:
                f.write("resumed from the step-1 checkpoint" if ckpt is not None else "restarted WITHOUT a checkpoint")
        return
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "state.txt"), "w") as f:
            f.write("step 1")
        ray.train.report({"step": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))
    if rank == 1:
        open(config["marker"], "w").close()
        os._exit(1)  # the node dies right after the (returned) report
    import time

    time.sleep(30)  # rank 0 keeps training until the controller notices


def main() -> int:
    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    tmp = tempfile.mkdtemp(prefix="rb-ck-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = f"{tmp}/ray"
    import socket

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    with socket.socket() as s:  # a dashboard port of its own: see pg_cleaner_wrong_dashboard.py
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, dashboard_port=port, log_to_driver=False)
    try:
        trainer = DataParallelTrainer(
            train_fn,
            train_loop_config={"marker": f"{tmp}/killed", "result": f"{tmp}/result"},
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(
                name="lost", storage_path=f"{tmp}/storage", failure_config=FailureConfig(max_failures=1)
            ),
        )
        trainer.fit()
        with open(f"{tmp}/result") as f:
            result = f.read()
        on_disk = [p for p in os.listdir(f"{tmp}/storage/lost") if p.startswith("checkpoint_")]
        print(f"after the restart: {result}; checkpoint directories on storage: {on_disk}")
        buggy = result.startswith("restarted WITHOUT") and bool(on_disk)
        print("BUG reproduced: a checkpoint every rank reported was never registered" if buggy else "not reproduced")
        return 0 if buggy else 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
