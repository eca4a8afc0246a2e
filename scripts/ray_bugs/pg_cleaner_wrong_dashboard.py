"""Ray 2.60 bug, minimal: a local Ray started without the dashboard asks ANOTHER cluster's state API about itself.

    .venv/bin/python scripts/ray_bugs/pg_cleaner_wrong_dashboard.py

1. Cluster A is started with `ray start --head` and its dashboard on 127.0.0.1:8265 (Ray's default port).
2. This process starts its own local Ray with `ray.init(include_dashboard=False)`. Ray still runs a minimal API
   server for it, but records `127.0.0.1:8265` — cluster A's dashboard — as this cluster's API address.
3. `ray.util.state.get_actor(<an actor of ours that is alive>)` is answered by cluster A: "no such actor".

Ray Train 2.60's PlacementGroupCleaner asks exactly that about the training controller once a second; on
"no such actor" it concludes the controller died and removes the training placement group, killing every
worker ("Destroying worker since its placement group was removed"). We saw it kill a 2-worker fine-tune
whenever another Ray with a dashboard ran on the machine (a test cluster, another user's Ray).

Workaround in raydist (``raydist.core.runs.embedded_ray_options``): always give the embedded Ray a free
``dashboard_port`` of its own, dashboard or not; then the cleaner asks our own (minimal) API server.
Prints what it found and exits 0 when the bug shows, 1 when it does not (e.g. fixed in a later Ray).
"""

import os
import subprocess
import sys
import tempfile

import ray


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": tmp}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--port=0",
            "--dashboard-port=8265",
            "--include-dashboard=true",
            "--num-cpus=1",
            f"--temp-dir={tmp}/a",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    try:
        os.environ["RAY_TMPDIR"] = f"{tmp}/b"
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        import ray.experimental.internal_kv as kv
        from ray._private import ray_constants
        from ray.util.state import get_actor

        recorded = kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)

        @ray.remote(num_cpus=0)
        class Alive:
            def ping(self):
                return "alive"

        actor = Alive.remote()
        ray.get(actor.ping.remote())
        state = get_actor(actor._actor_id.hex(), timeout=10)
        print(f"API address recorded for this cluster: {recorded!r} (cluster A's dashboard is 127.0.0.1:8265)")
        print(f"state API about our live actor: {state!r}")
        buggy = recorded == b"127.0.0.1:8265" and state is None
        print("BUG reproduced: the state API of another cluster answered for ours" if buggy else "not reproduced")
        return 0 if buggy else 1
    finally:
        ray.shutdown()
        # stop cluster A by its processes (never `ray stop`: it would stop every Ray on the machine)
        subprocess.run(["pkill", "-f", f"{tmp}/a"], check=False)


if __name__ == "__main__":
    sys.exit(main())
