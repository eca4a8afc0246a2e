"""The pipeline spec (`stage: pipeline`): loading, defaults, references and every refusal, without Ray."""

import json
from pathlib import Path

import pytest
import yaml

from raydist.cli import main
from raydist.config import ConfigError, PipelineConfig, load_stage_config, stage_config_class
from raydist.config.loading import config_from_dict
from raydist.config.pipeline import join_location, references
from raydist.core.runs import RunDirError
from raydist.jobs.pipeline import format_summary, plan_pipeline, preflight_pipeline, resolve_stage

REPO = Path(__file__).resolve().parents[3]
DATA = {"train": {"builtin": "pydoc_topics", "max_tokens": 4000}, "seq_len": 64}
FINETUNE = {"model": {"path": "tiny-random"}, "data": DATA}
DISTILL = {"data": DATA}


def spec(**sections):
    data = {"name": "chain", "output_dir": "/tmp/raydist-unit-runs"}
    data.update(sections)
    return data


def load(data) -> PipelineConfig:
    return config_from_dict(PipelineConfig, data)


def test_full_chain_defaults_connect_every_stage():
    cfg = load(spec(finetune=FINETUNE, distill=DISTILL, sweep={}, serve={}))
    assert cfg.stages() == ["finetune", "distill", "sweep", "serve"]
    assert cfg.distill.teacher.path == "@finetune"
    assert cfg.sweep.model.path == "@distill" and cfg.sweep.target == "compress"
    assert cfg.serve.artifact == "@sweep" and cfg.serve.model_name == "chain"
    for stage in ("finetune", "distill", "sweep"):
        run = getattr(cfg, stage).run
        assert (run.name, run.output_dir) == (stage, "/tmp/raydist-unit-runs/chain")
    assert cfg.directory == "/tmp/raydist-unit-runs/chain"
    assert references(cfg, "distill") == {"teacher.path": "@finetune"}


def test_previous_stage_is_the_default_and_explicit_values_win():
    cfg = load(spec(finetune=FINETUNE, sweep={}, serve={"model_name": "m"}))
    assert cfg.sweep.model.path == "@finetune" and cfg.serve.artifact == "@sweep" and cfg.serve.model_name == "m"
    cfg = load(
        spec(
            finetune={**FINETUNE, "run": {"name": "ft", "max_failures": 0}},
            distill=DISTILL,
            serve={"artifact": "@finetune"},
        )
    )
    assert cfg.finetune.run.name == "ft" and cfg.finetune.run.max_failures == 0
    assert cfg.serve.artifact == "@finetune"
    cfg = load(spec(distill={**DISTILL, "teacher": {"path": "tiny-random"}}, serve={}))
    assert cfg.distill.teacher.path == "tiny-random" and cfg.serve.artifact == "@distill"
    cfg = load(spec(serve={"artifact": "runs/x/artifact"}))  # serving only an existing artifact
    assert cfg.stages() == ["serve"]


def test_stage_dirs_under_a_uri_keep_its_query():
    cfg = load(spec(output_dir="s3://bucket/prefix?endpoint_override=127.0.0.1:9000", finetune=FINETUNE))
    assert cfg.finetune.run.output_dir == "s3://bucket/prefix/chain?endpoint_override=127.0.0.1:9000"
    assert (
        join_location("s3://bucket/prefix?region=x", "chain", "lineage.json")
        == "s3://bucket/prefix/chain/lineage.json?region=x"
    )
    assert join_location("runs", "chain") == "runs/chain"


def test_pipeline_job_reaches_every_stage():
    cfg = load(spec(job={"env": {"HF_HOME": "/cache"}}, finetune=FINETUNE, sweep={}))
    assert cfg.finetune.job.env == {"HF_HOME": "/cache"} and cfg.sweep.job.env == {"HF_HOME": "/cache"}


@pytest.mark.parametrize(
    "sections, message",
    [
        ({}, "a pipeline needs at least one of the sections finetune, distill, sweep, serve"),
        ({"serve": {}}, r"serve\.artifact: nothing to serve"),
        ({"distill": DISTILL}, r"distill\.teacher\.path: no stage of this pipeline produces a teacher"),
        ({"sweep": {}}, r"sweep\.model\.path: nothing to compress"),
        (
            {"finetune": FINETUNE, "sweep": {"target": "finetune"}},
            r"sweep\.target: the pipeline's sweep is a compression sweep",
        ),
        (
            {"finetune": FINETUNE, "serve": {"artifact": "@sweep"}},
            r"serve\.artifact: '@sweep' refers to the sweep stage, which this pipeline does not have",
        ),
        (
            {"finetune": FINETUNE, "distill": {**DISTILL, "teacher": {"path": "@sweep"}}, "sweep": {}},
            r"distill\.teacher\.path: '@sweep' refers to the sweep stage, which does not run before distill",
        ),
        (
            {"finetune": {**FINETUNE, "model": {"path": "@finetune"}}},
            r"finetune\.model\.path: '@finetune' refers to the finetune stage, which does not run before finetune",
        ),
        ({"finetune": FINETUNE, "serve": {"artifact": "@serve"}}, r"serve\.artifact: unknown reference '@serve'"),
        ({"finetune": FINETUNE, "serve": {"artifact": "@teacher"}}, r"serve\.artifact: unknown reference '@teacher'"),
        (
            {"finetune": FINETUNE, "distill": {**DISTILL, "teacher": {"path": "finetune"}}},
            r"distill\.teacher\.path: 'finetune' is not a path \(the teacher\); write '@finetune'",
        ),
        (
            {"finetune": FINETUNE, "distill": {**DISTILL, "teacher": {"path": "@finetune", "gguf_file": "m.gguf"}}},
            r"distill\.teacher\.gguf_file: '@finetune' is a stage's artifact",
        ),
        (
            {"finetune": FINETUNE, "distill": {**DISTILL, "data": {**DATA, "train": {"path": "@finetune"}}}},
            r"distill\.data\.train\.path: a stage reference \('@finetune'\) may only stand where a model path",
        ),
        (
            {"finetune": {**FINETUNE, "job": {"env": {}}}},
            r"finetune\.job: a stage inside a pipeline has no job section",
        ),
    ],
)
def test_stages_that_do_not_connect_are_refused_naming_the_field(sections, message):
    with pytest.raises(ConfigError, match=message):
        load(spec(**sections))


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"finetnue": FINETUNE}, r"finetnue: unknown field"),
        ({"finetune": {**FINETUNE, "optim": {"lrr": 1}}}, r"finetune\.optim\.lrr: unknown field"),
        ({"finetune": FINETUNE, "serve": {"run": {"name": "s"}}}, r"serve\.run: unknown field"),
        ({"finetune": {**FINETUNE, "stage": "distill"}}, r"finetune\.stage: Input should be 'finetune'"),
        ({"finetune": {**FINETUNE, "scaling": {"use_gpu": True}}}, r"scaling\.use_gpu was renamed"),
        ({"name": "a b", "finetune": FINETUNE}, r"name: String should match pattern"),
    ],
)
def test_unknown_and_invalid_keys_are_rejected(patch, message):
    with pytest.raises(ConfigError, match=message):
        load(spec(**patch))


def test_shipped_specs_load_through_the_stage_registry():
    assert stage_config_class("pipeline") is PipelineConfig
    tiny = load_stage_config(REPO / "jobs" / "pipeline_tiny.yaml")
    assert isinstance(tiny, PipelineConfig) and tiny.stages() == ["finetune", "distill", "sweep", "serve"]
    assert tiny.distill.teacher.path == "@finetune" and tiny.sweep.model.path == "@distill"
    smol = load_stage_config(REPO / "jobs" / "pipeline_smollm2.yaml", ["output_dir=/tmp/x"])
    assert smol.stages() == ["finetune", "distill", "sweep", "serve"]
    assert smol.finetune.run.output_dir == "/tmp/x/pipeline-smollm2"


def test_references_resolve_to_the_planned_artifacts(tmp_path):
    cfg = load(spec(output_dir=str(tmp_path), finetune=FINETUNE, distill=DISTILL, sweep={}, serve={}))
    plan = plan_pipeline(cfg)
    art = {s: str(tmp_path / "chain" / s / "artifact") for s in ("finetune", "distill", "sweep")}
    assert plan.artifacts == art and not plan.finished and not plan.started
    assert plan.configs["distill"].teacher.path == art["finetune"]
    assert plan.configs["sweep"].model.path == art["distill"]
    assert plan.configs["serve"].artifact == art["sweep"]
    assert resolve_stage(cfg, "serve", {"sweep": "s3://b/x"}).artifact == "s3://b/x"


def _finish(tmp_path, cfg, stage):
    """What a finished stage leaves: its run dir's config.yaml and an artifact with raydist.json."""
    from raydist.config.loading import dump_config
    from raydist.core.runs import with_absolute_paths

    run_dir = tmp_path / "chain" / stage
    (run_dir / "artifact").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(with_absolute_paths(plan_pipeline(cfg).configs[stage])))
    (run_dir / "artifact" / "raydist.json").write_text(json.dumps({"metrics": {"eval_ppl": 3.0}}))


def test_finished_stage_is_planned_as_skipped_and_a_changed_one_is_refused(tmp_path):
    cfg = load(spec(output_dir=str(tmp_path), finetune=FINETUNE, sweep={}))
    _finish(tmp_path, cfg, "finetune")
    plan = plan_pipeline(cfg)
    assert set(plan.finished) == {"finetune"} and plan.finished["finetune"]["metrics"] == {"eval_ppl": 3.0}
    # the run section may change between a run and its rerun
    assert set(
        plan_pipeline(
            load(spec(output_dir=str(tmp_path), sweep={}, finetune={**FINETUNE, "run": {"max_failures": 0}}))
        ).finished
    ) == {"finetune"}
    changed = load(spec(output_dir=str(tmp_path), sweep={}, finetune={**FINETUNE, "optim": {"lr": 1e-5}}))
    with pytest.raises(RunDirError, match=r"pipeline stage 'finetune' already finished .* \(optim\.lr differ\)"):
        plan_pipeline(changed)


def test_preflight_checks_referenced_stages_against_stand_ins_and_skips_unbuilt_artifacts(tmp_path):
    cfg = load(spec(output_dir=str(tmp_path), finetune=FINETUNE, distill=DISTILL, sweep={}, serve={}))
    text = "\n".join(preflight_pipeline(cfg))
    assert "teacher: @finetune (checked as tiny-random)" in text
    assert "model: @distill (checked as tiny-random)" in text and "artifact: @sweep (checked when the stage" in text
    # the distill stage's own checks still run with a referenced teacher: data, pruning against the teacher
    bad_data = load(
        spec(
            output_dir=str(tmp_path),
            finetune=FINETUNE,
            distill={**DISTILL, "data": {**DATA, "train": {"path": str(tmp_path / "missing.jsonl")}}},
        )
    )
    with pytest.raises(Exception, match=r"^distill\.data: .*missing\.jsonl"):
        preflight_pipeline(bad_data)
    bad_prune = load(
        spec(output_dir=str(tmp_path), finetune=FINETUNE, distill={**DISTILL, "student": {"prune": {"drop_layers": 2}}})
    )
    with pytest.raises(Exception, match=r"distill\.student\.prune\.drop_layers removes 2 of the teacher's 2 layers"):
        preflight_pipeline(bad_prune)
    bad_seq = load(
        spec(output_dir=str(tmp_path), finetune=FINETUNE, distill={**DISTILL, "data": {**DATA, "seq_len": 4096}})
    )
    with pytest.raises(Exception, match=r"distill\.data\.seq_len 4096 exceeds"):
        preflight_pipeline(bad_seq)
    missing_artifact = load(spec(output_dir=str(tmp_path), serve={"artifact": str(tmp_path / "nothing")}))
    with pytest.raises(Exception, match=r"serve\.artifact '.*nothing' is not a directory"):
        preflight_pipeline(missing_artifact)


def test_validate_command_accepts_a_pipeline_spec(tmp_path, capsys):
    spec_file = tmp_path / "p.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {"stage": "pipeline", **spec(output_dir=str(tmp_path), finetune=FINETUNE, distill=DISTILL, serve={})}
        )
    )
    assert main(["validate", "-c", str(spec_file)]) == 0
    out = capsys.readouterr().out
    assert "OK (pipeline chain: finetune -> distill -> serve)" in out and "artifact: @distill" in out
    # "@" cannot start a plain YAML scalar: a reference is quoted, in a file as in an override
    assert main(["validate", "-c", str(spec_file), 'serve.artifact="@sweep"']) == 2
    assert "serve.artifact: '@sweep' refers to the sweep stage" in capsys.readouterr().err
    assert main(["pipeline", "-c", str(REPO / "jobs" / "tiny_lora.yaml")]) == 2
    assert "run it with `raydist finetune`" in capsys.readouterr().err


def test_summary_table_shows_quality_size_speed_and_wall_time():
    lineage = {
        "pipeline": "chain",
        "stages": {
            "finetune": {
                "status": "done",
                "metrics": {"eval_ppl": 12.5, "eval_ppl_before": 20.0, "tokens_per_s": 900.0},
                "bytes_on_disk": 3 * 2**20,
                "num_parameters": 1_500_000,
                "wall_s": 31.2,
                "artifact": "/r/ft",
            },
            "sweep": {
                "status": "skipped-finished",
                "metrics": {"ppl": 13.0, "base_ppl": 12.9, "tokens_per_s": 55.5},
                "bytes_on_disk": 2**20,
                "num_parameters": 1000,
                "wall_s": None,
                "artifact": "/r/sw",
            },
            "serve": {"status": "pending"},
        },
    }
    table = format_summary(lineage).splitlines()
    assert table[1].split() == ["stage", "status", "quality", "size", "speed", "wall", "artifact"]
    ft = next(r for r in table if r.startswith("finetune"))
    assert "eval ppl 12.5 (from 20)" in ft and "3.0 MiB / 1.5M params" in ft and "900 tok/s (train)" in ft
    assert "31s" in ft and "/r/ft" in ft
    sw = next(r for r in table if r.startswith("sweep"))
    assert "ppl 13 (base 12.9)" in sw and "56 tok/s (generate)" in sw and "skipped-finished" in sw
