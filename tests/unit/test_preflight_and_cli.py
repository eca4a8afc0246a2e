import subprocess
import sys

import pytest

from raydist.cli import main
from raydist.config import FinetuneConfig
from raydist.config.loading import config_from_dict, dump_config
from raydist.core.preflight import PreflightError, preflight_finetune


def cfg(**over):
    data = {
        "model": {"path": "tiny-random"},
        "data": {"train": {"builtin": "pydoc_topics"}, "seq_len": 128},
        "run": {"name": "x"},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v}
    return config_from_dict(FinetuneConfig, data)


def test_valid_config_passes():
    report, tok = preflight_finetune(cfg())
    assert report.model_kind == "tiny" and report.data_formats == {"train": "text"} and tok.pad_token_id is not None


def test_lora_targets_absent_from_model():
    with pytest.raises(PreflightError, match=r"lora.target_modules \['c_attn'\] match no module"):
        preflight_finetune(cfg(lora={"enabled": True, "target_modules": ["q_proj", "c_attn"]}))


def test_seq_len_beyond_model_limit():
    with pytest.raises(PreflightError, match="data.seq_len 1024 exceeds the model's limit of 512"):
        preflight_finetune(cfg(data={"train": {"builtin": "pydoc_topics"}, "seq_len": 1024}))


def test_unknown_model():
    with pytest.raises(PreflightError, match="model.path: model './missing-model' not found"):
        preflight_finetune(cfg(model={"path": "./missing-model"}))


def test_missing_data_file(tmp_path):
    with pytest.raises(PreflightError, match="data file not found"):
        preflight_finetune(cfg(data={"train": {"path": str(tmp_path / "none.jsonl")}}))


def test_validate_cli_reports_and_exits_2(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(dump_config(cfg()))
    assert main(["validate", "-c", str(good)]) == 0
    assert "OK (finetune)" in capsys.readouterr().out
    assert main(["validate", "-c", str(good), "optim.lrr=1"]) == 2
    assert "optim.lrr: unknown field" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["validate", "-c", str(good), f"data.train.path={empty}", "data.train.builtin=null"]) == 2
    assert "is empty" in capsys.readouterr().err


def test_finetune_cli_refuses_bad_config_before_starting_ray(tmp_path, capsys):
    good = tmp_path / "c.yaml"
    good.write_text(dump_config(cfg()))
    # ray.init is forbidden in unit tests (conftest): reaching it would fail this test loudly.
    out_dir = tmp_path / "runs"
    assert (
        main(
            [
                "finetune",
                "-c",
                str(good),
                f"run.output_dir={out_dir}",
                "lora.enabled=true",
                "lora.target_modules=[nope]",
            ]
        )
        == 2
    )
    assert "match no module" in capsys.readouterr().err
    assert not out_dir.exists()


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "raydist.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "finetune" in out.stdout and "validate" in out.stdout
