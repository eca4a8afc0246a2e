"""The fine-tuning stage end to end on a local Ray: 2 CPU workers, DeepSpeed, a tiny random Llama.

The runs are module-scoped and shared: the uninterrupted ZeRO-2 run is the reference that the resumed
and the crashed runs must reproduce step for step.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from raydist.config import FinetuneConfig
from raydist.config.loading import config_from_dict
from raydist.core.artifact import read_manifest
from raydist.core.data import IGNORE_INDEX, collate
from raydist.core.models import load_model
from raydist.core.progress import read_history
from raydist.core.runs import RunDirError
from raydist.train.finetune import run_finetune

pytestmark = pytest.mark.integration

TINY = {
    "model": {"path": "tiny-random"},
    "data": {"train": {"builtin": "pydoc_topics", "max_tokens": 24000}, "seq_len": 64, "max_eval_sequences": 16},
    "optim": {"lr": 3e-3, "warmup_steps": 1, "schedule": "constant"},
    "train": {"max_steps": 8, "micro_batch_size": 4, "eval_every": 4, "checkpoint_every": 2, "keep_checkpoints": 2},
    "deepspeed": {"zero_stage": 2},
    "scaling": {"num_workers": 2},
}


def make_cfg(tmp: Path, name: str, **patch) -> FinetuneConfig:
    data = json.loads(json.dumps(TINY))
    for dotted, value in patch.items():
        node = data
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    data["run"] = {"name": name, "output_dir": str(tmp), **data.get("run", {})}
    return config_from_dict(FinetuneConfig, data)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in read_history(run_dir / "metrics.jsonl") if "tokens_per_s" in h}


def eval_loss_of(model_dir: Path, run_dir: Path) -> float:
    """Recompute the eval loss of an exported model from the run's tokenized eval data."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = pq.read_table(run_dir / "data" / "eval.parquet").to_pylist()
    b = collate(rows, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    labels = b["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    return float(nll)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def full_zero2(runs):
    """The reference run, driven through the CLI exactly as a user would."""
    from raydist.cli import main

    cfg_file = runs / "full.yaml"
    cfg_file.write_text(yaml.safe_dump({**TINY, "run": {"name": "placeholder"}}))
    assert main(["finetune", "-c", str(cfg_file), "run.name=full-z2", f"run.output_dir={runs}"]) == 0
    return runs / "full-z2"


def test_zero2_full_finetune_learns_and_exports(full_zero2):
    run_dir = full_zero2
    art = run_dir / "artifact"
    manifest = read_manifest(art)
    m = manifest["metrics"]
    # Loss went down: eval before vs. after, and the train curve's end vs. its start.
    assert m["eval_loss"] < m["eval_loss_before"] - 0.3
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 0.3
    # Parameters changed from the (seeded, reproducible) initial weights.
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(art)
    initial = load_model(FinetuneConfig.model_validate(manifest["config"]).model, seed=0)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, initial.state_dict()[n])]
    assert len(changed) == len(list(trained.named_parameters()))
    # The export reproduces the trained model: logits checked in the worker, eval loss re-derived here.
    assert m["export_max_abs_logit_diff"] < 1e-4
    assert eval_loss_of(art, run_dir) == pytest.approx(m["eval_loss"], rel=1e-3)
    # Manifest contract.
    assert manifest["stage"] == "finetune" and manifest["parent"]["kind"] == "tiny"
    assert manifest["num_parameters"] == sum(p.numel() for p in trained.parameters())
    assert manifest["bytes_on_disk"] > manifest["weight_bytes"] > 0
    assert manifest["versions"]["deepspeed"] and manifest["versions"]["ray"]
    # Checkpoints: only the last K kept; the loss curve exists.
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 2
    assert (run_dir / "loss_curve.png").stat().st_size > 5000


def test_zero3_lora_learns_and_exports_nonempty_adapter(runs):
    cfg = make_cfg(
        runs,
        "lora-z3",
        deepspeed__zero_stage=3,
        lora__enabled=True,
        lora__r=8,
        lora__alpha=16,
        optim__lr=1e-2,
        train__checkpoint_every=4,
    )
    art = run_finetune(cfg)
    m = read_manifest(art)
    assert m["metrics"]["eval_loss"] < m["metrics"]["eval_loss_before"] - 0.05
    assert m["lora"]["adapter_nonzero"] is True
    # Base + adapter through peft gives the merged model's logits (adapter saved under ZeRO-3 is complete).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_model(cfg.model, seed=cfg.train.seed)
    with_adapter = PeftModel.from_pretrained(base, art / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(art).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert m["metrics"]["export_max_abs_logit_diff"] < 1e-3
    assert eval_loss_of(art, art.parent) == pytest.approx(m["metrics"]["eval_loss"], rel=1e-3)


def test_resume_continues_from_the_checkpoint_step(runs, full_zero2):
    # Checkpoint cadence differs from the reference run's, which does not change the training math.
    cfg = make_cfg(runs, "resume", run__stop_after_steps=3, train__checkpoint_every=3)
    stopped = run_finetune(cfg)
    assert stopped == runs / "resume" and not (stopped / "artifact").exists()
    assert max(train_losses(stopped)) == 3
    # A changed config is refused before anything runs, and the checkpoint stays (the resume below uses it).
    with pytest.raises(RunDirError, match=r"different config \(optim.lr differ\)"):
        run_finetune(make_cfg(runs, "resume", optim__lr=1e-3, train__checkpoint_every=3))
    assert len([p for p in stopped.glob("checkpoint_*") if p.is_dir()]) == 1
    resumed_cfg = make_cfg(runs, "resume", train__checkpoint_every=3)
    art = run_finetune(resumed_cfg)
    history = read_history(stopped / "metrics.jsonl")
    assert {"event": "resumed", "step": 3}.items() <= next(h for h in history if h.get("event") == "resumed").items()
    losses = train_losses(stopped)
    assert sorted(losses) == list(range(1, 9))
    # Exact resume (weights, optimizer, scheduler, RNG, data position mid-epoch): the resumed run's
    # losses equal the uninterrupted run's, step for step.
    ref = train_losses(full_zero2)
    for s in range(1, 9):
        assert losses[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-5), f"step {s}"
    assert read_manifest(art)["metrics"]["eval_loss"] == pytest.approx(
        read_manifest(full_zero2 / "artifact")["metrics"]["eval_loss"], rel=1e-4
    )


def test_worker_crash_recovers_from_checkpoint(runs, full_zero2, monkeypatch):
    marker = runs / "fault.marker"
    monkeypatch.setenv("RAYDIST_FAULT_AT_STEP", "5")
    monkeypatch.setenv("RAYDIST_FAULT_MARKER", str(marker))
    art = run_finetune(make_cfg(runs, "crash"))
    assert marker.read_text().startswith("killed rank 1 at step 5")
    history = read_history(runs / "crash" / "metrics.jsonl")
    resumed = [h for h in history if h.get("event") == "resumed"]
    # Resumed from a checkpoint before the crash, not from step 0. Usually step 4; Ray Train collects
    # reports asynchronously, so a crash right after a report may lose it and resume from step 2.
    assert len(resumed) == 1 and resumed[0]["step"] in (2, 4)
    losses, ref = train_losses(runs / "crash"), train_losses(full_zero2)
    assert sorted(losses) == list(range(1, 9))
    for s in range(1, 9):
        assert losses[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-5), f"step {s}"
    assert (art / "raydist.json").is_file()


def test_finished_run_is_refused_not_overwritten(runs, full_zero2):
    before = (full_zero2 / "artifact" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(RunDirError, match="already complete"):
        run_finetune(make_cfg(runs, "full-z2"))
    assert (full_zero2 / "artifact" / "model.safetensors").stat().st_mtime_ns == before
