"""Every file under cluster/ (and the multi-GPU job template) validated without a cloud or Kubernetes.

- Ray cluster-launcher YAML against the JSON schema Ray ships (``ray/autoscaler/ray-schema.json``), then
  through what ``ray up`` does before it calls the cloud (``prepare_config`` + ``validate_config``).
- KubeRay manifests against the CRDs' ``openAPIV3Schema`` (vendored in tests/data/kuberay/), plus a check that
  every key is declared: Kubernetes prunes unknown fields instead of rejecting them, so a typo would
  otherwise be silently dropped.
- Every raydist spec embedded in them (the RayJob's pipeline spec, the RayService's ServeConfig args, the
  8-GPU template) against raydist's own config models.

Each check also gets a broken input it must reject, so none of them passes vacuously. No Ray is started.
"""

from __future__ import annotations

import copy
import gzip
import json
import shlex
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[3]
CLUSTER = ROOT / "cluster"
VENDORED = ROOT / "tests" / "data" / "kuberay"
SHARED_CRDS = ROOT.parent / "shared" / "kuberay-crds"
LAUNCHER_FILES = ("aws.yaml", "gcp.yaml")
KUBERAY_FILES = ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml")
MULTIGPU_JOB = ROOT / "jobs" / "multigpu_8b_lora_distill.yaml"
# Fields of Kubernetes' ObjectMeta a manifest may set: the API server (not the CRD schema, which only says
# `type: object`) owns the top-level `metadata`.
OBJECT_META_FIELDS = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences"}
UNDECLARED = "not declared in the CRD (Kubernetes would drop it)"


# ---------------------------------------------------------------------------------------------- loading


def load_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"
    return docs


def manifests() -> dict[str, dict[str, Any]]:
    """{kind: manifest} over every KubeRay file (each kind appears once)."""
    out: dict[str, dict[str, Any]] = {}
    for rel in KUBERAY_FILES:
        for doc in load_docs(CLUSTER / rel):
            assert doc["kind"] not in out, f"{rel}: a second {doc['kind']}"
            out[doc["kind"]] = doc
    return out


def test_every_cluster_file_is_validated_here():
    """A new file under cluster/ must be added to this module, not slip through unchecked."""
    on_disk = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml", ".json")}
    assert on_disk == set(LAUNCHER_FILES) | set(KUBERAY_FILES)


# ------------------------------------------------------------------------------ Ray cluster launcher YAML


@pytest.fixture(scope="module")
def launcher_validator():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)  # the schema says draft-07
    cls.check_schema(schema)
    return cls(schema)


def dotted(path) -> str:
    """``spec.workerGroupSpecs[0].template`` from a jsonschema error path."""
    out = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return out or "<root>"


def schema_errors(validator, document: dict[str, Any]) -> list[str]:
    """Schema violations as 'path: message' lines (empty when valid)."""
    return [
        f"{dotted(e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    ]


def launcher_errors(validator, cfg: dict[str, Any]) -> list[str]:
    return schema_errors(validator, cfg)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_matches_ray_schema(launcher_validator, name):
    (cfg,) = load_docs(CLUSTER / name)
    assert launcher_errors(launcher_validator, cfg) == []


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_passes_ray_up_checks(name):
    """What `ray up` runs before any cloud call: merge the provider's defaults, check docker and worker counts."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    (cfg,) = load_docs(CLUSTER / name)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["available_node_types"].keys() == cfg["available_node_types"].keys()


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_cpu_head_gpu_workers_and_raydist_installed(name):
    (cfg,) = load_docs(CLUSTER / name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU") == 0 and "guestAccelerators" not in head["node_config"], "head must be CPU-only"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers
    for key, node in workers.items():
        nc = node["node_config"]
        if cfg["provider"]["type"] == "aws":  # GPUs are detected from the instance type: g* / p* families
            assert nc["InstanceType"][0] in "gp", key
            # Workers write checkpoints to S3: they need credentials of their own (the head's are Ray's).
            assert "IamInstanceProfile" in nc, key
        else:  # GCP reports no accelerators before boot: resources must say what guestAccelerators attach
            assert node["resources"]["GPU"] == sum(a["acceleratorCount"] for a in nc["guestAccelerators"]) > 0, key
            assert nc["serviceAccounts"], key
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cfg["max_workers"], key
    # Ray inside the containers must be the Ray raydist pins.
    for image in (cfg["docker"]["head_image"], cfg["docker"]["worker_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image
    assert any("pip install" in c and "raydist" in c for c in cfg["setup_commands"]), "setup must install raydist"


def test_launcher_validation_rejects_broken_configs(launcher_validator):
    (good,) = load_docs(CLUSTER / "aws.yaml")

    missing = copy.deepcopy(good)
    del missing["provider"]
    assert any("'provider' is a required property" in e for e in launcher_errors(launcher_validator, missing))

    typo = copy.deepcopy(good)
    typo["setup_command"] = typo.pop("setup_commands")
    assert any("setup_command" in e for e in launcher_errors(launcher_validator, typo))

    fractional = copy.deepcopy(good)
    fractional["available_node_types"]["gpu.g5.12xlarge"]["resources"] = {"GPU": 0.5}
    errors = launcher_errors(launcher_validator, fractional)
    assert any(e.startswith("available_node_types.gpu.g5.12xlarge.resources.GPU") for e in errors), errors

    node_typo = copy.deepcopy(good)
    node_typo["available_node_types"]["gpu.p4d.24xlarge"]["max_worker"] = 2
    assert any("max_worker" in e for e in launcher_errors(launcher_validator, node_typo))

    from ray.autoscaler._private.util import prepare_config, validate_config

    no_head = copy.deepcopy(good)
    no_head["head_node_type"] = "ray.head.missing"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(no_head))


# ----------------------------------------------------------------------------------- KubeRay manifests


def openapi_to_jsonschema(node: Any) -> Any:
    """A CRD's OpenAPI v3 schema as JSON Schema (draft 4): `nullable` becomes a null alternative, and
    `x-kubernetes-int-or-string` accepts integers and strings even where the CRD gives no `anyOf`."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def undeclared_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys of ``value`` that ``schema`` does not declare: what the API server would silently prune."""
    found = []
    if isinstance(value, dict):
        props = dict(schema.get("properties", {}))
        for sub in schema.get("allOf", []) + schema.get("anyOf", []) + schema.get("oneOf", []):
            props.update(sub.get("properties", {}))
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key in props:
                found += undeclared_fields(item, props[key], where)
            elif isinstance(extra, dict):
                found += undeclared_fields(item, extra, where)
            elif not (extra is True or schema.get("x-kubernetes-preserve-unknown-fields")):
                found.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += undeclared_fields(item, schema["items"], f"{path}[{i}]")
    return found


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict[str, Any]]:
    """{kind: raw openAPIV3Schema} from the vendored copies."""
    return {
        kind: json.loads(gzip.decompress((VENDORED / f"{kind.lower()}.v1.schema.json.gz").read_bytes()))
        for kind in ("RayCluster", "RayJob", "RayService")
    }


def crd_errors(manifest: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Schema violations and undeclared keys of one manifest (empty when the API server would take it as is)."""
    errors = schema_errors(jsonschema.Draft4Validator(openapi_to_jsonschema(schema)), manifest)
    body = {k: v for k, v in manifest.items() if k != "metadata"}
    errors += [f"{p}: {UNDECLARED}" for p in undeclared_fields(body, schema)]
    meta = manifest.get("metadata", {})
    errors += [f"metadata.{k}: not an ObjectMeta field" for k in meta if k not in OBJECT_META_FIELDS]
    return errors


def test_vendored_schemas_equal_the_shared_crds(crd_schemas):
    if not SHARED_CRDS.is_dir():
        pytest.skip("../shared/kuberay-crds is absent (a clean clone); the vendored copies are used as they are")
    for kind, schema in crd_schemas.items():
        crd = yaml.load((SHARED_CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=yaml.CSafeLoader)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        assert v1["schema"]["openAPIV3Schema"] == schema, f"{kind}: regenerate (tests/data/kuberay/README.md)"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_kuberay_manifest_matches_crd(crd_schemas, kind):
    manifest = manifests()[kind]
    assert manifest["apiVersion"] == "ray.io/v1"
    assert crd_errors(manifest, crd_schemas[kind]) == []


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    return {
        "RayCluster": lambda: spec,
        "RayJob": lambda: spec["rayClusterSpec"],
        "RayService": lambda: spec["rayClusterConfig"],
    }[manifest["kind"]]()


def gpu_limit(group: dict[str, Any]) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in group["template"]["spec"]["containers"]
    )


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_kuberay_cluster_cpu_head_autoscaled_gpu_workers(kind):
    spec = cluster_spec(manifests()[kind])
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert gpu_limit(spec["headGroupSpec"]) == 0 and spec["headGroupSpec"]["rayStartParams"].get("num-gpus", "0") == "0"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpu_limit(g) > 0]
    assert gpu_groups
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]


def test_crd_validation_rejects_broken_manifests(crd_schemas):
    good = manifests()["RayCluster"]
    schema = crd_schemas["RayCluster"]

    # A misspelled field passes the schema alone (the CRD does not forbid unknown keys: Kubernetes prunes
    # them); only the declared-keys check catches it.
    typo = copy.deepcopy(good)
    typo["spec"]["enableInTreeAutoscalling"] = typo["spec"].pop("enableInTreeAutoscaling")
    assert list(jsonschema.Draft4Validator(openapi_to_jsonschema(schema)).iter_errors(typo)) == []
    assert crd_errors(typo, schema) == [f"spec.enableInTreeAutoscalling: {UNDECLARED}"]

    deep_typo = copy.deepcopy(good)
    deep_typo["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    container = "spec.workerGroupSpecs[0].template.spec.containers[0]"
    assert crd_errors(deep_typo, schema) == [f"{container}.resource: {UNDECLARED}"]

    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    assert any(
        e.startswith("spec.workerGroupSpecs[0].maxReplicas: '8' is not of type 'integer'")
        for e in crd_errors(wrong_type, schema)
    )

    missing = copy.deepcopy(good)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("'groupName' is a required property" in e for e in crd_errors(missing, schema))

    # Quantities are int-or-string: 1 and "1" are both fine, a list is not.
    def limits(m):
        return m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]

    for ok in (1, "1", "500m"):
        m = copy.deepcopy(good)
        limits(m)["nvidia.com/gpu"] = ok
        assert crd_errors(m, schema) == [], ok
    bad = copy.deepcopy(good)
    limits(bad)["cpu"] = [8]
    assert crd_errors(bad, schema)

    meta = copy.deepcopy(good)
    meta["metadata"]["label"] = {"a": "b"}
    assert crd_errors(meta, schema) == ["metadata.label: not an ObjectMeta field"]


def test_openapi_transform_handles_int_or_string_and_nullable():
    schema = openapi_to_jsonschema(
        {
            "type": "object",
            "properties": {"q": {"x-kubernetes-int-or-string": True}, "n": {"type": "string", "nullable": True}},
        }
    )
    v = jsonschema.Draft4Validator(schema)
    assert v.is_valid({"q": 2, "n": None}) and v.is_valid({"q": "2Gi", "n": "x"})
    assert not v.is_valid({"q": 2.5}) and not v.is_valid({"n": 3})


# ------------------------------------------------------------------------- raydist specs embedded in them


def validate_raydist(data: dict[str, Any], source: str):
    """The spec as raydist's config model for its ``stage`` (raises ConfigError naming the bad field)."""
    from raydist.config import stage_config_class
    from raydist.config.loading import config_from_dict

    return config_from_dict(stage_config_class(data["stage"]), data, source)


def rayjob_pipeline_spec() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(RayJob, ConfigMap, the pipeline spec it ships)."""
    docs = {d["kind"]: d for d in load_docs(CLUSTER / "kuberay/rayjob.yaml")}
    cm = docs["ConfigMap"]
    (spec_text,) = cm["data"].values()
    return docs["RayJob"], cm, yaml.safe_load(spec_text)


def test_rayjob_entrypoint_runs_the_configmap_pipeline_spec():
    job, cm, spec = rayjob_pipeline_spec()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["raydist", "pipeline"]
    path = Path(argv[argv.index("-c") + 1])
    # The entrypoint runs on the head pod: the ConfigMap must be mounted there, at the path it reads.
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = [
        m
        for c in head["containers"]
        for m in c.get("volumeMounts", [])
        if volumes.get(m["name"], {}).get("configMap", {}).get("name") == cm["metadata"]["name"]
    ]
    assert [Path(m["mountPath"]) for m in mounts] == [path.parent]
    assert path.name in cm["data"]
    assert cm["apiVersion"] == "v1"
    assert set(cm) <= {"apiVersion", "kind", "metadata", "data"}

    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) <= RuntimeEnv.known_fields
    RuntimeEnv(**runtime_env)  # Ray's own type checks


def test_rayjob_pipeline_spec_is_a_valid_pipeline():
    _, _, spec = rayjob_pipeline_spec()
    cfg = validate_raydist(spec, "rayjob.yaml ConfigMap")
    assert type(cfg).__name__ == "PipelineConfig"
    assert spec["output_dir"].startswith(("s3://", "gs://")), "multi-node runs need shared storage"
    assert {"finetune", "distill", "sweep"} <= spec.keys()


def test_multigpu_template_is_a_valid_8gpu_pipeline():
    (spec,) = load_docs(MULTIGPU_JOB)
    cfg = validate_raydist(spec, str(MULTIGPU_JOB))
    assert type(cfg).__name__ == "PipelineConfig"
    assert spec["output_dir"].startswith(("s3://", "gs://"))
    for stage in ("finetune", "distill"):
        assert spec[stage]["scaling"]["num_workers"] == 8, stage
        assert spec[stage]["resources"]["num_gpus"] == 1, stage
        assert spec[stage]["deepspeed"]["zero_stage"] == 3, stage
    assert spec["finetune"]["lora"]["enabled"] is True
    assert cfg.distill.teacher.path == "@finetune"


def rayservice_app() -> dict[str, Any]:
    (app,) = yaml.safe_load(manifests()["RayService"]["spec"]["serveConfigV2"])["applications"]
    return app


def undeclared_model_keys(value: Any, model: type, path: str = "") -> list[str]:
    """Keys of ``value`` that the pydantic ``model`` (and the models of its fields) do not declare. Ray Serve's
    config schemas ignore unknown keys, so a misspelled deployment option would be dropped without a word."""
    from pydantic import BaseModel

    def models_in(annotation: Any) -> list[type]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    if not isinstance(value, dict):
        return []
    fields = {**model.model_fields, **{f.alias: f for f in model.model_fields.values() if f.alias}}
    found = []
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            found.append(where)
            continue
        for sub in models_in(fields[key].annotation)[:1]:
            if isinstance(item, list):
                for i, element in enumerate(item):
                    found += undeclared_model_keys(element, sub, f"{where}[{i}]")
            else:
                found += undeclared_model_keys(item, sub, where)
    return found


def serve_config_errors(serve_config: dict[str, Any]) -> list[str]:
    """Ray Serve's own validation of a serveConfigV2 plus undeclared keys (empty when Serve takes it as is)."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(serve_config)
        # The deployment schema keeps autoscaling_config a plain dict; Serve checks it only when it deploys.
        for app in serve_config["applications"]:
            for dep in app.get("deployments", []):
                if isinstance(dep.get("autoscaling_config"), dict):
                    AutoscalingConfig.model_validate(dep["autoscaling_config"])
    except ValidationError as e:
        return [str(e)]
    return [f"{p}: not a Ray Serve config field" for p in undeclared_model_keys(serve_config, ServeDeploySchema)]


def test_rayservice_serve_config_is_valid_for_ray_serve_and_raydist():
    from raydist.serve.app import config_from_args, deployment_options

    assert serve_config_errors(yaml.safe_load(manifests()["RayService"]["spec"]["serveConfigV2"])) == []
    app = rayservice_app()
    assert app["import_path"] == "raydist.serve:app_builder"
    cfg = config_from_args(app["args"])
    # It serves what the RayJob's pipeline exports: <output_dir>/<name>/sweep/artifact.
    _, _, pipeline = rayjob_pipeline_spec()
    assert cfg.artifact == f"{pipeline['output_dir']}/{pipeline['name']}/sweep/artifact"
    assert cfg.autoscaling is not None and cfg.autoscaling.max_replicas > cfg.autoscaling.min_replicas
    # The deployment the overrides target is the one raydist builds, and they say what the app says.
    (dep,) = app["deployments"]
    assert dep["name"] == deployment_options(cfg, num_gpus=0)["name"]
    assert dep["autoscaling_config"] == {
        k: v for k, v in cfg.autoscaling.model_dump().items() if k in dep["autoscaling_config"]
    }


def test_raydist_spec_validation_rejects_typos():
    from raydist.config.loading import ConfigError
    from raydist.serve.app import config_from_args

    _, _, spec = rayjob_pipeline_spec()
    typo = copy.deepcopy(spec)
    typo["finetune"]["optim"]["lrr"] = typo["finetune"]["optim"].pop("lr")
    with pytest.raises(ConfigError, match="lrr"):
        validate_raydist(typo, "typo")

    (template,) = load_docs(MULTIGPU_JOB)
    old_keys = copy.deepcopy(template)
    old_keys["distill"]["scaling"]["use_gpu"] = True  # the old spelling is refused, naming the new one
    with pytest.raises(ConfigError, match="resources"):
        validate_raydist(old_keys, "old keys")

    args = copy.deepcopy(rayservice_app()["args"])
    args["autoscalling"] = args.pop("autoscaling")
    with pytest.raises(ConfigError, match="autoscalling"):
        config_from_args(args)

    serve = yaml.safe_load(manifests()["RayService"]["spec"]["serveConfigV2"])
    dep = serve["applications"][0]["deployments"][0]
    dep["autoscaling_config"]["max_replica"] = dep["autoscaling_config"].pop("max_replicas")
    assert serve_config_errors(serve) == [
        "applications[0].deployments[0].autoscaling_config.max_replica: not a Ray Serve config field"
    ]
    dep["autoscaling_config"] = {"min_replicas": 4, "max_replicas": 2}  # Serve's own check
    assert any("max_replicas" in e for e in serve_config_errors(serve))
