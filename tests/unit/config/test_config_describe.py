"""`raydist config <stage>`: the printed YAML is every field of the stage with its default and help text."""

import pytest
import yaml

from raydist.cli import main
from raydist.config import GenerateConfig, stage_config_class
from raydist.config.describe import describe
from raydist.config.loading import config_from_dict

STAGES = ["finetune", "distill", "generate", "sweep", "serve", "pipeline"]


def _check_defaults(cls, printed: dict, where: str) -> None:
    """Every field is printed; a field with a default prints that default; required ones print null."""
    assert set(printed) == set(cls.model_fields), where
    for name, field in cls.model_fields.items():
        value = printed[name]
        if field.is_required():
            if isinstance(value, dict):  # a required sub-config: its own fields, with their defaults
                sub = field.annotation
                _check_defaults(sub, value, f"{where}.{name}")
            else:
                assert value is None, f"{where}.{name}"
            continue
        default = field.get_default(call_default_factory=True)
        dumped = default.model_dump(mode="json") if hasattr(default, "model_dump") else default
        if hasattr(default, "model_dump"):  # the parent's default sub-config, as its factory builds it
            assert set(value) == set(type(default).model_fields), f"{where}.{name}"
            assert value == yaml.safe_load(yaml.safe_dump(dumped)), f"{where}.{name}"
        else:
            assert value == yaml.safe_load(yaml.safe_dump(dumped)), f"{where}.{name}"


@pytest.mark.parametrize("stage", STAGES)
def test_every_field_with_its_default_and_help(stage):
    text = describe(stage)
    cls = stage_config_class(stage)
    _check_defaults(cls, yaml.safe_load(text), stage)
    for name, field in cls.model_fields.items():
        if field.description:
            assert "# " + field.description.split()[0] in text, name
    assert f"stage: {stage}" in text


def test_filled_in_it_loads_as_the_defaults(tmp_path):
    data = yaml.safe_load(describe("generate"))
    data["model"]["path"] = "tiny-random"
    data["prompts"]["path"] = str(tmp_path / "prompts.jsonl")
    data["output"] = str(tmp_path / "out.jsonl")
    loaded = config_from_dict(GenerateConfig, data)
    expected = GenerateConfig(
        model={"path": "tiny-random"}, prompts={"path": data["prompts"]["path"]}, output=data["output"]
    )
    assert loaded.model_dump() == expected.model_dump()


def test_cli_prints_it(capsys):
    assert main(["config", "sweep"]) in (0, None)
    out = capsys.readouterr().out
    assert out == describe("sweep")
    with pytest.raises(SystemExit):
        main(["config", "nope"])
