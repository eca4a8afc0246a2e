"""Serve config, app building and artifact loading, without starting Ray."""

import os
from pathlib import Path

import pytest
import torch

from raydist.cli import main
from raydist.config import ConfigError, ModelConfig, ServeConfig, load_stage_config
from raydist.config.loading import config_from_dict
from raydist.core.models import load_model, save_model_dir
from raydist.serve.app import app_builder, config_from_args, deployment_options, resolve_api_key
from raydist.serve.loading import ArtifactError, check_artifact, default_model_id, load_served_model

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp("serve") / "myrun" / "artifact"
    save_model_dir(load_model(ModelConfig(path="tiny-random"), seed=0), tiny_tokenizer, out)
    return out


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"batching\.max_batch_sise: unknown field"):
        config_from_dict(ServeConfig, {"artifact": "x", "batching": {"max_batch_sise": 4}})
    with pytest.raises(ConfigError, match="can't provide both num_replicas and autoscaling"):
        config_from_dict(ServeConfig, {"artifact": "x", "num_replicas": 2, "autoscaling": {}})
    with pytest.raises(ConfigError, match=r"max_replicas \(1\) is below min_replicas \(3\)"):
        config_from_dict(ServeConfig, {"artifact": "x", "autoscaling": {"min_replicas": 3, "max_replicas": 1}})
    with pytest.raises(ConfigError, match=r"default_max_tokens \(64\) exceeds max_tokens \(32\)"):
        config_from_dict(ServeConfig, {"artifact": "x", "limits": {"max_tokens": 32, "default_max_tokens": 64}})
    with pytest.raises(ConfigError, match="a batch could never fill"):
        config_from_dict(
            ServeConfig, {"artifact": "x", "batching": {"max_batch_size": 32}, "limits": {"max_ongoing_requests": 8}}
        )
    with pytest.raises(ConfigError, match="queue_full_status"):
        config_from_dict(ServeConfig, {"artifact": "x", "limits": {"queue_full_status": 500}})


def test_example_jobs_load_as_serve_configs():
    for job in ("serve_tiny.yaml", "serve_smollm2.yaml"):
        cfg = load_stage_config(REPO / "jobs" / job)
        assert isinstance(cfg, ServeConfig) and cfg.stage == "serve"


def test_serve_run_arguments_and_deployment_options(tiny_dir, monkeypatch):
    cfg = config_from_args(
        {
            "artifact": str(tiny_dir),
            "limits.max_tokens": "64",
            "batching": {"max_batch_size": 4},
            "autoscaling.max_replicas": "3",
        }
    )
    assert cfg.limits.max_tokens == 64 and cfg.batching.max_batch_size == 4 and cfg.autoscaling.max_replicas == 3
    opts = deployment_options(cfg, num_gpus=0.0)
    assert "num_replicas" not in opts and opts["autoscaling_config"].max_replicas == 3
    assert opts["backpressure_config"].status_code == 503 and opts["backpressure_config"].retry_after_s == 1.0
    # the replica admits 64 + 256 itself (OpenAI's error body beyond); Serve sends a few more so it can refuse them
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"]) == (64 + 256 + 8, -1)
    actor = opts["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"]) == (1.0, 0)
    # replicas get the driver's storage credentials (tests/conftest.py sets fake AWS ones) to read artifact URIs
    assert actor["runtime_env"]["env_vars"]["AWS_ACCESS_KEY_ID"] == os.environ["AWS_ACCESS_KEY_ID"]
    # torch's OpenMP threads sleep between parallel regions (they share cores with the loop and the proxy) ...
    assert actor["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    # ... unless the spec's job.env says otherwise
    spinning = ServeConfig(artifact="x", job={"env": {"OMP_WAIT_POLICY": "ACTIVE"}})
    assert (
        deployment_options(spinning, num_gpus=0.0)["ray_actor_options"]["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"]
        == "ACTIVE"
    )
    assert deployment_options(ServeConfig(artifact="x", num_replicas=2), num_gpus=1.0)["num_replicas"] == 2
    with pytest.raises(ConfigError, match="limits.max_tokens"):
        config_from_args({"artifact": str(tiny_dir), "limits.max_tokens": "-1"})
    # The builder `serve run raydist.serve:app_builder ...` uses: an Application, without starting Ray.
    from ray.serve import Application

    assert isinstance(app_builder({"artifact": str(tiny_dir)}), Application)
    monkeypatch.delenv("RAYDIST_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="RAYDIST_TEST_KEY"):
        resolve_api_key(ServeConfig(artifact="x", auth={"api_key_env": "RAYDIST_TEST_KEY"}))
    monkeypatch.setenv("RAYDIST_TEST_KEY", "s3cret")
    assert resolve_api_key(ServeConfig(artifact="x", auth={"api_key_env": "RAYDIST_TEST_KEY"})) == "s3cret"


def test_cli_refuses_bad_targets_with_exit_code_2(tiny_dir, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "neither an artifact directory nor a serve config" in capsys.readouterr().err
    assert main(["serve", str(tiny_dir), "limits.max_tokenz=3"]) == 2
    assert "limits.max_tokenz: unknown field" in capsys.readouterr().err
    # the same CLI shape as every stage: -c, then dotted overrides (all of them reach the config)
    assert main(["serve", "-c", str(tiny_dir), "http.port=8123", "limits.max_tokenz=3"]) == 2
    assert "limits.max_tokenz: unknown field" in capsys.readouterr().err
    assert main(["serve", "-c", str(tmp_path / "missing")]) == 2
    assert "neither an artifact directory nor a serve config" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "needs -c" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 2  # a directory without a model
    assert "no config.json" in capsys.readouterr().err
    finetune_cfg = REPO / "jobs" / "tiny_lora.yaml"
    assert main(["serve", str(finetune_cfg)]) == 2
    assert "run it with `raydist finetune`" in capsys.readouterr().err
    yaml_cfg = tmp_path / "serve.yaml"
    yaml_cfg.write_text(f"stage: serve\nartifact: {tiny_dir}\n")
    assert main(["validate", "-c", str(yaml_cfg)]) == 0
    assert "OK (serve" in capsys.readouterr().out
    # validate also takes an artifact directory (what `raydist serve DIR` would serve), with overrides
    assert main(["validate", "-c", str(tiny_dir), "limits.max_n=2"]) == 0
    assert f"OK (serve, artifact {tiny_dir}" in capsys.readouterr().out
    assert main(["validate", "-c", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["validate", "-c", str(tiny_dir), "limits.max_tokenz=3"]) == 2
    assert "limits.max_tokenz: unknown field" in capsys.readouterr().err


def test_model_id_and_artifact_checks(tiny_dir, tmp_path):
    assert default_model_id(str(tiny_dir)) == "myrun"
    assert default_model_id(str(tiny_dir.parent)) == "myrun"
    with pytest.raises(ArtifactError, match="not a directory"):
        check_artifact(str(tmp_path / "nope"))
    with pytest.raises(ArtifactError, match="no adapter_config.json"):
        check_artifact(str(tiny_dir), adapter=str(tmp_path))


def test_lora_adapter_is_merged_at_load(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(ModelConfig(path=str(tiny_dir)))
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )  # non-zero B: the adapter changes outputs
    lora.peft_config["default"].base_model_name_or_path = str(tiny_dir)
    lora.save_pretrained(tmp_path / "adapter")
    probe = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = lora(input_ids=probe).logits
        plain = load_model(ModelConfig(path=str(tiny_dir)))(input_ids=probe).logits
    assert not torch.allclose(want, plain, atol=1e-4)
    for artifact, adapter in ((str(tiny_dir), str(tmp_path / "adapter")), (str(tmp_path / "adapter"), None)):
        model, tok, manifest = load_served_model(artifact, adapter, "cpu", "auto")
        with torch.no_grad():
            got = model(input_ids=probe).logits
        assert torch.allclose(got, want, atol=1e-5) and tok.pad_token is not None and manifest is None


def test_quantized_artifact_is_served_with_its_scheme(tiny_dir, tmp_path, tiny_tokenizer):
    from raydist.compress.quant.format import save_compressed
    from raydist.compress.quant.layer import QuantizedLinear
    from raydist.compress.quant.quantize import quantize_model
    from raydist.serve.engine import BatchGenerator, GenerationRequest, SamplingParams

    model = load_model(ModelConfig(path=str(tiny_dir)))
    report = quantize_model(model, "int8_dynamic")
    save_compressed(model, tiny_tokenizer, tmp_path / "q", report)
    served, tok, manifest = load_served_model(str(tmp_path / "q"), None, "cpu", "auto")
    assert manifest["quantization"]["scheme"] == "int8_dynamic"
    assert any(isinstance(m, QuantizedLinear) for m in served.modules())
    ids = tok.encode("def main():")
    want = BatchGenerator(model, tok).generate([GenerationRequest(ids, SamplingParams(6, 0.0))])[0].text
    assert BatchGenerator(served, tok).generate([GenerationRequest(ids, SamplingParams(6, 0.0))])[0].text == want
    with pytest.raises(ArtifactError, match="resources.dtype must stay 'auto'"):
        load_served_model(str(tmp_path / "q"), None, "cpu", "bfloat16")
