"""Building and running the Serve application.

- :func:`build_app` turns a :class:`~raydist.config.serve.ServeConfig` into a Serve ``Application``.
- :func:`app_builder` is the same for Ray's own CLI: ``serve run raydist.serve:app_builder artifact=DIR``
  (or a Serve config file whose ``import_path`` is ``raydist.serve:app_builder`` and whose ``args`` hold a
  ServeConfig, or ``config: path/to/serve.yaml`` plus dotted overrides).
- :func:`run_serve` is `raydist serve`: start (or join) Ray, deploy, print the URL, block until Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

from raydist.config.loading import ConfigError, apply_overrides, config_from_dict, read_yaml
from raydist.config.serve import ServeConfig


def resolve_api_key(cfg: ServeConfig) -> Optional[str]:
    """The API key from the config or its environment variable (None = no auth).

    Raises:
        ConfigError: ``auth.api_key_env`` names an unset or empty variable.
    """
    if cfg.auth.api_key is not None:
        return cfg.auth.api_key
    if cfg.auth.api_key_env is not None:
        key = os.environ.get(cfg.auth.api_key_env, "")
        if not key:
            raise ConfigError(f"auth.api_key_env: environment variable {cfg.auth.api_key_env!r} is unset or empty")
        return key
    return None


def replica_gpus(cfg: ServeConfig) -> float:
    """GPUs per replica, resolved against the connected cluster (``auto``: 1 when it has one per replica).

    Raises:
        PreflightError: the cluster cannot place a replica (GPUs asked of a cluster without any, ...).
    """
    import ray

    from raydist.core.resources import plan_units

    if not ray.is_initialized():  # building the app offline (``serve build``): only explicit numbers count
        g = cfg.resources.num_gpus
        return 0.0 if g == "auto" else float(g)
    replicas = cfg.autoscaling.min_replicas if cfg.autoscaling else (cfg.num_replicas or 1)
    return plan_units(cfg.resources, max(1, replicas), "serve replica").num_gpus


ADMISSION_HEADROOM = 8  # requests Serve sends a replica beyond what it admits, so it can refuse them itself


def deployment_options(cfg: ServeConfig, num_gpus: float) -> dict[str, Any]:
    """Ray Serve deployment options derived from the config (replicas, autoscaling, limits, resources)."""
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    # The replica itself admits up to max_ongoing + max_queued generation requests and refuses the rest with
    # OpenAI's error body (Serve's own backpressure answers plain text). Serve lets a few more through
    # (ADMISSION_HEADROOM) so those refusals are the replica's.
    admitted = cfg.limits.admitted()
    opts: dict[str, Any] = {
        "name": "OpenAIServer",
        "max_ongoing_requests": (
            cfg.limits.max_ongoing_requests if admitted is None else admitted + ADMISSION_HEADROOM
        ),
        # the router queue then holds requests only while it picks a replica; the replica refuses the excess
        "max_queued_requests": -1,
        "backpressure_config": BackpressureConfig(
            status_code=cfg.limits.queue_full_status, retry_after_s=cfg.limits.retry_after_s
        ),
        "health_check_period_s": cfg.health.check_period_s,
        "health_check_timeout_s": cfg.health.check_timeout_s,
        "ray_actor_options": {"num_cpus": cfg.resources.num_cpus, "num_gpus": num_gpus},
    }
    from raydist.core.storage import storage_env

    # Replicas read an artifact URI with the driver's storage credentials / endpoint; REPLICA_ENV first, so
    # `job.env` can override it.
    env = {**REPLICA_ENV, **storage_env(), **cfg.job.env}
    opts["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    if cfg.max_replicas_per_node is not None:
        opts["max_replicas_per_node"] = cfg.max_replicas_per_node
    if cfg.autoscaling is not None:
        a = cfg.autoscaling
        opts["autoscaling_config"] = AutoscalingConfig(
            min_replicas=a.min_replicas,
            max_replicas=a.max_replicas,
            target_ongoing_requests=a.target_ongoing_requests,
            upscale_delay_s=a.upscale_delay_s,
            downscale_delay_s=a.downscale_delay_s,
            look_back_period_s=a.look_back_period_s,
        )
    else:
        opts["num_replicas"] = cfg.num_replicas or 1
    return opts


# OpenMP threads that sleep instead of spinning between parallel regions. A replica shares its cores with its
# own event loop, Serve's proxy and the clients: spinning torch threads then wait on a descheduled sibling at
# every barrier: at 16 concurrent requests on 2 cores spinning threads cut throughput several-fold (in-process
# decoding alone, where nothing else competes for the cores, spins faster at batch 1: the replica pays that).
REPLICA_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def build_app(cfg: ServeConfig, api_key: Optional[str] = None):
    """The Serve application for ``cfg``.

    Args:
        cfg: the serve config (``artifact`` must exist where the replicas run).
        api_key: overrides the key resolved from ``cfg.auth``.

    Raises:
        ArtifactError: the artifact directory holds no model.
        ConfigError: the API key variable is unset, or a GPU is required but absent.
    """
    import warnings

    from ray import serve

    from raydist.serve.deployment import OpenAIServer
    from raydist.serve.loading import check_artifact

    # Absolute paths: replicas run in other processes (and working directories).
    cfg = cfg.model_copy(
        update={
            "artifact": str(check_artifact(cfg.artifact, cfg.adapter)),
            "adapter": str(Path(cfg.adapter).expanduser().resolve()) if cfg.adapter else None,
        }
    )
    key = api_key if api_key is not None else resolve_api_key(cfg)
    with warnings.catch_warnings():  # short look-back windows (tests) warn about Serve's metric interval
        warnings.simplefilter("ignore")
        deployment = serve.deployment(OpenAIServer).options(**deployment_options(cfg, replica_gpus(cfg)))
    return deployment.bind(cfg.model_dump(mode="json"), key)


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    """A ServeConfig from ``serve run`` arguments: an optional ``config`` YAML path, then the other
    arguments on top (nested values as given, ``a.b=value`` strings from the command line YAML-parsed)."""
    args = dict(args)
    data = read_yaml(args.pop("config")) if "config" in args else {}
    overrides = []
    for key, value in args.items():
        if isinstance(value, str):
            overrides.append(f"{key}={value}")
        else:
            data[key] = value
    return config_from_dict(ServeConfig, apply_overrides(data, overrides), "serve run arguments")


def app_builder(args: dict[str, Any]):
    """Application builder for Ray's CLI: ``serve run raydist.serve:app_builder artifact=runs/x/artifact``."""
    return build_app(config_from_args(args))


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_serve(cfg: ServeConfig, *, blocking: bool = True, verbose: bool = True) -> str:
    """`raydist serve`: deploy on the local Ray (or ``RAY_ADDRESS``) and block until Ctrl-C.

    Returns:
        The OpenAI base URL (``http://host:port/prefix/v1``); only when ``blocking`` is False.

    Raises:
        ArtifactError / ConfigError: before Ray starts.
        StageFailed: the replicas did not start (the message carries Serve's reason).
    """
    import ray
    from ray import serve

    from raydist.core.runs import StageFailed, init_ray
    from raydist.serve.loading import check_artifact, default_model_id

    say = print if verbose else (lambda *a, **k: None)
    check_artifact(cfg.artifact, cfg.adapter)
    key = resolve_api_key(cfg)
    started_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    replicas = cfg.autoscaling.max_replicas if cfg.autoscaling else (cfg.num_replicas or 1)
    init_ray(cfg.resources.num_cpus * replicas, metrics=True)  # /metrics of the embedded Ray
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    app = build_app(cfg, key)
    say(f"[raydist] deploying {cfg.artifact} as Serve application {cfg.app_name!r} ...")
    if blocking:
        # Ctrl-C and `kill` (SIGTERM, e.g. from a container runtime) both stop cleanly, also while the replicas
        # are still starting; a shell that started us in the background may have left SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    deployed, url = False, None
    try:
        try:
            serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # Serve reports a replica that cannot start as a RuntimeError with the cause
            raise StageFailed(f"the Serve application did not start: {str(e)[-2000:]}") from e
        deployed = True
        host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
        url = f"http://{host}:{cfg.http.port}{cfg.route_prefix.rstrip('/')}/v1"
        say(
            f"[raydist] serving model {cfg.model_name or default_model_id(cfg.artifact)!r} at {url} (OpenAI API; "
            f"health: {url[:-3]}/health, readiness: {url[:-3]}/ready). Ctrl-C stops."
        )
        if not blocking:
            return url
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        say("[raydist] stopping ...")
    finally:
        if blocking or not deployed:
            serve.delete(cfg.app_name)
            if started_ray:
                serve.shutdown()
                ray.shutdown()
    return url
