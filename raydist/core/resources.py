"""Resources, one spelling for every stage: what the driver asks Ray for, and the device a unit then uses.

Driver side (``plan_units``): ``resources.num_gpus: auto`` becomes a number from the *cluster's* resources
(never the driver's own hardware: a CPU-only head drives GPU workers), and what cannot be placed — GPUs
asked of a cluster that has none, a unit larger than every node, STRICT_SPREAD over more workers than
nodes — is refused before anything starts.

Unit side (``unit_device``): a train worker, sweep trial, generate actor or serve replica decides its own
device from the GPUs Ray assigned to *it* (``ray.get_gpu_ids()``), honouring ``resources.device``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from raydist.core.preflight import PreflightError

# On an autoscaling cluster the GPU nodes a job needs may not be up yet when it starts: this switches the
# placement check off (Ray then waits for the autoscaler instead of the check refusing the job).
SKIP_CHECK_ENV = "RAYDIST_SKIP_PLACEMENT_CHECK"


@dataclass(frozen=True)
class UnitPlan:
    """What each of ``count`` units reserves, resolved against the cluster."""

    num_cpus: float
    num_gpus: float
    device: str  # the ``resources.device`` setting the unit applies ("auto", "cpu", "cuda")
    count: int

    @property
    def computes_on_gpu(self) -> bool:
        """Whether the units will compute on GPUs (they hold some and are not forced onto the CPU)."""
        return self.num_gpus > 0 and self.device != "cpu"

    def ray_resources(self) -> dict[str, float]:
        """Ray's resource dict of one unit (``{"CPU": c, "GPU": g}``; no GPU key when 0)."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}

    def describe(self) -> str:
        gpu = f" + {self.num_gpus:g} GPU" if self.num_gpus else ""
        on = "GPU" if self.computes_on_gpu else "CPU"
        return f"{self.count} x ({self.num_cpus:g} CPU{gpu}) computing on {on}"


def alive_nodes() -> list[dict[str, Any]]:
    """``[{"id", "resources"}]`` of the cluster's live nodes (the connected Ray)."""
    import ray

    return [{"id": n["NodeID"], "resources": dict(n.get("Resources") or {})} for n in ray.nodes() if n.get("Alive")]


def plan_units(
    resources,
    count: int,
    what: str,
    *,
    field: str = "resources",
    placement_strategy: str = "PACK",
    nodes: Optional[list[dict[str, Any]]] = None,
) -> UnitPlan:
    """Resolve ``resources`` (a ``ResourceSettings``) for ``count`` units of ``what`` on the connected cluster.

    Args:
        resources: the stage's ``resources`` section.
        count: how many units run at once (workers, concurrent trials, actors, replicas).
        what: a name for messages ("training worker", "sweep trial", ...).
        field: the config path of ``resources`` (for messages).
        placement_strategy: Ray's strategy for the units (STRICT_SPREAD needs a node per unit).
        nodes: the cluster's nodes (default: ``alive_nodes()``); for tests.

    Raises:
        PreflightError: the cluster cannot place the units (unless ``RAYDIST_SKIP_PLACEMENT_CHECK=1``).
    """
    nodes = alive_nodes() if nodes is None else nodes
    total_gpus = sum(n["resources"].get("GPU", 0) for n in nodes)
    gpus = resources.num_gpus
    if gpus == "auto":
        gpus = 1.0 if total_gpus >= count and resources.device != "cpu" else 0.0
    plan = UnitPlan(num_cpus=float(resources.num_cpus), num_gpus=float(gpus), device=resources.device, count=count)
    if resources.device == "cuda" and plan.num_gpus == 0:
        raise PreflightError(
            f"{field}.device is 'cuda' but {field}.num_gpus resolved to 0 "
            f"(the cluster has {total_gpus:g} GPUs); give num_gpus or use device auto/cpu"
        )
    if os.environ.get(SKIP_CHECK_ENV) == "1":
        return plan
    check_placement(plan, what, field, placement_strategy, nodes)
    return plan


def check_placement(plan: UnitPlan, what: str, field: str, placement_strategy: str, nodes: list[dict[str, Any]]):
    """Refuse a plan the cluster's current nodes cannot hold (see ``plan_units``)."""
    hint = f" (on an autoscaling cluster whose nodes are not up yet, set {SKIP_CHECK_ENV}=1 to let Ray wait for them)"
    total_gpus = sum(n["resources"].get("GPU", 0) for n in nodes)
    if plan.num_gpus > 0 and total_gpus == 0:
        raise PreflightError(
            f"{field}.num_gpus is {plan.num_gpus:g} per {what} but the cluster has no GPUs; "
            f"set {field}.num_gpus: 0 (or auto) to run on CPUs" + hint
        )
    need = plan.ray_resources()

    def fits(node) -> int:
        """How many units this node holds at most."""
        return int(min(node["resources"].get(k, 0) // v for k, v in need.items() if v > 0))

    per_node = [fits(n) for n in nodes]
    if not any(per_node):
        biggest = max(nodes, key=lambda n: (n["resources"].get("GPU", 0), n["resources"].get("CPU", 0)), default=None)
        has = biggest["resources"] if biggest else {}
        raise PreflightError(
            f"one {what} asks for {need} but no node of the cluster has that much (the largest has "
            f"{has.get('CPU', 0):g} CPU, {has.get('GPU', 0):g} GPU); lower {field}.num_cpus / num_gpus" + hint
        )
    if placement_strategy == "STRICT_SPREAD" and sum(1 for k in per_node if k) < plan.count:
        raise PreflightError(
            f"placement STRICT_SPREAD puts each of the {plan.count} {what}s on its own node, but only "
            f"{sum(1 for k in per_node if k)} node(s) can hold one" + hint
        )
    if placement_strategy == "STRICT_PACK" and max(per_node) < plan.count:
        raise PreflightError(
            f"placement STRICT_PACK puts all {plan.count} {what}s on one node, but no node "
            f"holds more than {max(per_node)}" + hint
        )


def unit_device(device_setting: str, what: str = "worker", *, train_worker: bool = False):
    """The torch device this unit computes on, from the GPUs Ray assigned to it (call inside the unit).

    ``train_worker``: a Ray Train worker, whose CUDA_VISIBLE_DEVICES lists every GPU its node's workers hold
    (for NCCL); Ray Train then picks this rank's by local rank.

    Raises:
        RuntimeError: ``cuda`` was asked without an assigned GPU, or Ray assigned GPUs that torch cannot see
            (with ``device: auto``; ``device: cpu`` computes on the CPU regardless).
    """
    import ray
    import torch

    gpu_ids = ray.get_gpu_ids()
    if device_setting == "cpu":
        return torch.device("cpu")
    if gpu_ids:
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"Ray assigned GPU(s) {gpu_ids} to this {what} (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}) but torch sees no CUDA device here; set "
                "resources.device: cpu to compute on the CPU"
            )
        if train_worker:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda", 0)  # Ray narrows CUDA_VISIBLE_DEVICES to this unit's GPUs
    if device_setting == "cuda":
        raise RuntimeError(f"resources.device is 'cuda' but Ray assigned no GPU to this {what}")
    return torch.device("cpu")


def assigned_accelerators() -> dict[str, Any]:
    """What Ray gave this unit (for reports and tests): GPU ids, CUDA_VISIBLE_DEVICES and the node id."""
    import ray

    return {
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "node_id": ray.get_runtime_context().get_node_id(),
    }
