"""The distillation stage on a local Ray: a briefly trained tiny teacher → a student pruned from it."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from raydist.cli import main
from raydist.config import FinetuneConfig, ModelConfig
from raydist.config.distill import DistillConfig
from raydist.config.loading import config_from_dict
from raydist.core.artifact import read_manifest
from raydist.core.models import load_model
from raydist.core.preflight import PreflightError
from raydist.core.progress import read_history
from raydist.distill.distill import run_distill
from raydist.distill.teacher_cache import CacheMismatchError
from raydist.train.finetune import run_finetune

pytestmark = pytest.mark.integration

DATA = {"train": {"builtin": "pydoc_topics", "max_tokens": 24000}, "seq_len": 64, "max_eval_sequences": 16}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Teacher correction first (as Minitron does): a full fine-tune on the same data."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = config_from_dict(
        FinetuneConfig,
        {
            "model": {"path": "tiny-random", "tiny": {"num_layers": 4}},
            "data": DATA,
            "optim": {"lr": 3e-3, "schedule": "constant"},
            "train": {"max_steps": 12, "micro_batch_size": 4, "eval_at_start": False},
            "run": {"name": "teacher", "output_dir": str(out)},
        },
    )
    return run_finetune(cfg)


def distill_cfg(teacher, out, **kd):
    return {
        "teacher": {"path": str(teacher)},
        "student": {
            "source": "pruned",
            "prune": {"drop_layers": 1, "mlp_keep_ratio": 0.5, "kv_groups_keep": 1, "calibration_batches": 4},
        },
        "data": DATA,
        "kd": {"loss": "forward_kl", "ce_weight": 0.0, **kd},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "train": {"max_steps": 8, "micro_batch_size": 4, "eval_every": 4, "checkpoint_every": 4},
        "deepspeed": {"zero_stage": 2},
        "run": {"name": "kd", "output_dir": str(out)},
    }


def train_losses(run_dir: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in read_history(run_dir / "metrics.jsonl") if "tokens_per_s" in h}


@pytest.fixture(scope="module")
def online_run(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("online")
    cfg_file = out / "distill.yaml"
    cfg_file.write_text(yaml.safe_dump(distill_cfg(teacher, out)))
    assert main(["distill", "-c", str(cfg_file)]) == 0
    return out / "kd"


def test_online_kd_from_pruned_student(teacher, online_run):
    art = online_run / "artifact"
    m = read_manifest(art)
    # The student really is smaller: 3 of 4 layers, half the MLP, one of two KV groups.
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(art)
    t_model = AutoModelForCausalLM.from_pretrained(teacher)
    assert student.config.num_hidden_layers == 3 and student.config.intermediate_size == 64
    assert student.config.num_key_value_heads == 1 and student.config.num_attention_heads == 2
    assert m["num_parameters"] < 0.7 * sum(p.numel() for p in t_model.parameters())
    # The KD loss falls and the student moves toward the teacher.
    losses = train_losses(online_run)
    assert losses[8] < losses[1]
    met = m["metrics"]
    assert met["teacher_ppl"] < met["pruned_before_training_ppl"]
    assert met["eval_ppl"] < met["pruned_before_training_ppl"]
    assert 0 < met["gap_recovered"] <= 1.5
    assert m["stage"] == "distill" and m["parent"]["role"] == "teacher" and m["student"]["source"] == "pruned"
    assert met["export_max_abs_logit_diff"] < 1e-3


def test_mismatched_tokenizer_is_refused(teacher, tmp_path):
    from transformers import AutoTokenizer

    from raydist.config import ModelConfig
    from raydist.core.models import load_model, save_model_dir

    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(teacher)
    vocab = tok.get_vocab()
    swapped = dict(vocab)  # same size, two ids swapped: a different vocabulary
    a, b = sorted(vocab, key=vocab.get)[10:12]
    swapped[a], swapped[b] = vocab[b], vocab[a]
    tj = json.loads((Path(teacher) / "tokenizer.json").read_text())
    tj["model"]["vocab"] = swapped
    save_model_dir(load_model(ModelConfig(path="tiny-random")), tok, other)
    (other / "tokenizer.json").write_text(json.dumps(tj))
    cfg = config_from_dict(
        DistillConfig, {**distill_cfg(teacher, tmp_path), "student": {"source": "pretrained", "path": str(other)}}
    )
    with pytest.raises(PreflightError, match="tokenizers differ.*sequence-level KD"):
        run_distill(cfg)
    assert not (tmp_path / "kd").exists()


def test_cache_with_full_vocab_reproduces_online_training(teacher, online_run, tmp_path):
    """k = vocab size with float32 storage: the cached top-k loss is the full loss, so training matches the online
    run; the default float16 storage reads back through Ray Data and trains within half precision of it."""
    cache = tmp_path / "cache"
    cfg = distill_cfg(
        teacher, tmp_path, teacher_mode="cache", top_k=512, cache_dir=str(cache), cache_precision="float32"
    )
    art = run_distill(config_from_dict(DistillConfig, cfg))
    manifest = json.loads((cache / "cache.json").read_text())
    assert manifest["key"]["top_k"] == 512 and manifest["payload_bytes_per_token"] == 512 * 4 + 512 * 2 + 4
    assert 0 < manifest["disk_bytes_per_token"] and manifest["tokens"] > 0
    online, cached = train_losses(online_run), train_losses(art.parent)
    for step in range(1, 9):
        assert cached[step] == pytest.approx(online[step], rel=1e-3), step
    half = {**cfg, "kd": {**cfg["kd"], "cache_dir": str(tmp_path / "cache16"), "cache_precision": "float16"}}
    half["run"] = {**cfg["run"], "name": "kd-fp16"}
    half["train"] = {**cfg["train"], "max_steps": 2, "eval_every": None, "checkpoint_every": None}
    run_distill(config_from_dict(DistillConfig, half))
    assert json.loads((tmp_path / "cache16" / "cache.json").read_text())["payload_bytes_per_token"] == 512 * 4 + 4
    fp16 = train_losses(tmp_path / "kd-fp16")
    assert fp16[1] == pytest.approx(online[1], rel=1e-2)
    m = read_manifest(art)
    assert m["teacher_mode"] == "cache" and m["metrics"]["eval_ppl"] < m["metrics"]["pruned_before_training_ppl"]
    # A second run with the same teacher/data/tokenizer/k reuses the cache untouched ...
    stamp = (cache / "cache.json").stat().st_mtime_ns
    cfg["run"]["name"] = "kd-again"
    cfg["train"]["max_steps"] = 2
    run_distill(config_from_dict(DistillConfig, cfg))
    assert (cache / "cache.json").stat().st_mtime_ns == stamp
    # ... and one that needs a different cache is refused before training, the cache left as it was.
    cfg["run"]["name"] = "kd-k16"
    cfg["kd"]["top_k"] = 16
    with pytest.raises(CacheMismatchError, match="different top_k"):
        run_distill(config_from_dict(DistillConfig, cfg))
    assert (cache / "cache.json").stat().st_mtime_ns == stamp
    assert not list((tmp_path / "kd-k16").glob("checkpoint_*"))


@pytest.mark.parametrize("entries", ["sampled", "top_k_tail"])
def test_drawn_cache_through_the_cli(teacher, online_run, tmp_path, entries):
    """kd.cache_entries sampled (64 draws per token) or top_k_tail (the top 48 + 16 tail draws): training from
    the cache tracks the online run (an unbiased gradient), and a top-k run pointed at that cache is refused."""
    cache = tmp_path / "cache"
    kd = {"cache_entries": entries, **({"cache_tail_draws": 16} if entries == "top_k_tail" else {})}
    cfg = distill_cfg(teacher, tmp_path, teacher_mode="cache", cache_dir=str(cache), **kd)
    cfg["train"] = {**cfg["train"], "max_steps": 4, "checkpoint_every": None}
    cfg_file = tmp_path / "distill.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert main(["distill", "-c", str(cfg_file)]) == 0
    key = json.loads((cache / "cache.json").read_text())["key"]
    assert key["entries"] == entries and key["seed"] == 0 and key["top_k"] == 64
    assert key.get("tail_draws") == (16 if entries == "top_k_tail" else None)
    # The first cached row holds what the teacher gives: its exact top 48 (top_k_tail) and a distribution
    row = pq.read_table(sorted(cache.glob("part-*.parquet"))[0]).slice(0, 1).to_pylist()[0]
    logp = np.asarray(row["topk_logprobs"], dtype=np.float32).reshape(-1, 64)
    ids = np.asarray(row["topk_indices"]).reshape(-1, 64)
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-2)  # float16 log-probabilities
    if entries == "top_k_tail":
        model = load_model(ModelConfig(path=str(teacher))).eval()
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.tensor([row["input_ids"]])).logits[0].float(), -1)
        top_p, top_i = probs.topk(48, -1)
        for t in range(len(row["input_ids"])):
            kept = dict(zip(ids[t].tolist(), np.exp(logp[t]).tolist()))
            assert [kept[i] for i in top_i[t].tolist()] == pytest.approx(top_p[t].tolist(), rel=2e-3, abs=1e-6)
    drawn = {h["step"]: h["eval_ppl"] for h in read_history(tmp_path / "kd" / "metrics.jsonl") if "eval_ppl" in h}
    online = {h["step"]: h["eval_ppl"] for h in read_history(online_run / "metrics.jsonl") if "eval_ppl" in h}
    # training from it tracks the online run (4 steps move this student's ppl by ~1 %: the tolerance is 2 %)
    assert drawn[4] != drawn[0] and drawn[4] == pytest.approx(online[4], rel=0.02), (drawn, online)
    top_k = {**cfg, "kd": {**cfg["kd"], "cache_entries": "top_k"}, "run": {**cfg["run"], "name": "kd-topk"}}
    top_k["kd"].pop("cache_tail_draws", None)
    with pytest.raises(CacheMismatchError, match="different"):
        run_distill(config_from_dict(DistillConfig, top_k))


def test_last_hidden_cache_trains_as_the_online_teacher(teacher, online_run, tmp_path):
    """kd.cache_entries last_hidden through the CLI: the cache keeps the teacher's last hidden states (and its
    output layer), and training from it follows the online run step by step (the same loss, exact up to the
    float16 storage)."""
    cache = tmp_path / "cache"
    cfg = distill_cfg(teacher, tmp_path, teacher_mode="cache", cache_dir=str(cache), cache_entries="last_hidden")
    cfg["train"] = {**cfg["train"], "max_steps": 4, "checkpoint_every": None}
    cfg_file = tmp_path / "distill.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert main(["distill", "-c", str(cfg_file)]) == 0
    manifest = json.loads((cache / "cache.json").read_text())
    hidden_size = load_model(ModelConfig(path=str(teacher))).config.hidden_size
    assert manifest["key"]["entries"] == "last_hidden" and "top_k" not in manifest["key"]
    assert manifest["payload_bytes_per_token"] == 2 * hidden_size
    assert manifest["head_bytes"] == (cache / "head.safetensors").stat().st_size > 0
    row = pq.read_table(sorted(cache.glob("part-*.parquet"))[0]).slice(0, 1).to_pylist()[0]
    assert len(row["teacher_hidden"]) == len(row["input_ids"]) * hidden_size
    cached, online = train_losses(tmp_path / "kd"), train_losses(online_run)
    for step in range(1, 5):
        assert cached[step] == pytest.approx(online[step], rel=2e-3), (step, cached, online)
    evals = {h["step"]: h["eval_ppl"] for h in read_history(tmp_path / "kd" / "metrics.jsonl") if "eval_ppl" in h}
    want = {h["step"]: h["eval_ppl"] for h in read_history(online_run / "metrics.jsonl") if "eval_ppl" in h}
    assert evals[4] != evals[0] and evals[4] == pytest.approx(want[4], rel=1e-3)
    # The same cache with the output layer run in bfloat16 (kd.cache_head_dtype): the first step's loss (same
    # student, same batch) moves by the head's rounding only, and does move (the setting reaches the workers).
    cfg["kd"]["cache_head_dtype"] = "bfloat16"
    cfg["run"]["name"] = "kd-bf16-head"
    cfg["train"].update(max_steps=1, eval_every=None)
    run_distill(config_from_dict(DistillConfig, cfg))
    bf16_head = train_losses(tmp_path / "kd-bf16-head")
    assert bf16_head[1] == pytest.approx(cached[1], rel=1e-2) and bf16_head[1] != cached[1]


def test_distill_resumes_exactly(teacher, online_run, tmp_path):
    """Resume works as in fine-tuning: stop after 4 steps, rerun, and the losses match the online run."""
    cfg = distill_cfg(teacher, tmp_path)
    cfg["run"]["stop_after_steps"] = 4
    run_dir = run_distill(config_from_dict(DistillConfig, cfg))
    assert not (run_dir / "artifact").exists() and max(train_losses(run_dir)) == 4
    del cfg["run"]["stop_after_steps"]
    art = run_distill(config_from_dict(DistillConfig, cfg))
    resumed = [h for h in read_history(run_dir / "metrics.jsonl") if h.get("event") == "resumed"]
    assert [h["step"] for h in resumed] == [4]
    online, again = train_losses(online_run), train_losses(run_dir)
    for step in range(1, 9):
        assert again[step] == pytest.approx(online[step], rel=1e-4), step
    # The gap is measured against the pruned student's first evaluation, also after the resume.
    assert read_manifest(art)["metrics"]["gap_recovered"] == pytest.approx(
        read_manifest(online_run / "artifact")["metrics"]["gap_recovered"], rel=1e-3
    )


def test_hidden_state_loss_under_zero3(teacher, tmp_path):
    """JSD + hidden-state matching through a learned projection, student sharded by ZeRO-3: the
    projection trains with the student and only the student is exported."""
    cfg = distill_cfg(
        teacher,
        tmp_path,
        loss="jsd",
        beta=0.5,
        temperature=2.0,
        ce_weight=0.2,
        hidden={"weight": 1.0, "kind": "cosine"},
    )
    cfg["deepspeed"]["zero_stage"] = 3
    cfg["train"].update(max_steps=6, eval_every=None, checkpoint_every=None)
    art = run_distill(config_from_dict(DistillConfig, cfg))
    losses = train_losses(art.parent)
    assert losses[6] < losses[1]
    from safetensors.torch import load_file

    weights = load_file(str(art / "model.safetensors"))
    assert not any("projection" in k or k.startswith("student.") for k in weights)
    m = read_manifest(art)
    assert m["metrics"]["export_max_abs_logit_diff"] < 1e-3 and m["config"]["kd"]["hidden"]["weight"] == 1.0


def test_on_policy_kd_through_the_cli_under_zero3(teacher, tmp_path):
    """kd.on_policy: after start_step off-policy steps, for about half of the micro-batches (a seeded coin per
    micro-batch) the student, sharded by ZeRO-3 over two workers (ranks kept in step while decoding),
    completes the instruction prompts and learns the teacher's distribution on its own tokens (reverse KL);
    the rest train on the dataset's responses. Every step logs its phases' seconds."""
    from raydist.core.data import pydoc_topics_text
    from raydist.distill.on_policy import is_on_policy

    words = pydoc_topics_text().split()
    records = [
        {"instruction": "Continue: " + " ".join(words[i : i + 12]), "output": " ".join(words[i + 12 : i + 24])}
        for i in range(0, 24 * 80, 24)
    ]
    data_file = tmp_path / "tasks.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    op = {"lmbda": 0.5, "max_new_tokens": 8, "temperature": 1.0, "start_step": 2}
    cfg = distill_cfg(teacher, tmp_path, on_policy=op)
    cfg["data"] = {"train": {"path": str(data_file), "format": "instruction"}, "seq_len": 64, "max_eval_sequences": 8}
    cfg["deepspeed"]["zero_stage"] = 3
    cfg["train"].update(max_steps=6, eval_every=None, checkpoint_every=None)
    cfg_file = tmp_path / "distill.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert main(["distill", "-c", str(cfg_file)]) == 0
    run_dir = tmp_path / "kd"
    history = read_history(run_dir / "metrics.jsonl")
    on = [h for h in history if h.get("event") == "on_policy"]
    # one micro-batch per step here: micro m is step m + 1; the coin picks 1, 2, 3 and 5, start_step drops 1
    assert [h["micro"] for h in on] == [m for m in range(2, 6) if is_on_policy(0, m, 0.5)] == [2, 3, 5]
    assert all(h["step"] > 2 and 0 < h["completion_tokens"] <= 4 * 8 for h in on)
    phases = [h["phase_s"] for h in history if "tokens_per_s" in h]
    assert len(phases) == 6 and all(set(p) == {"data", "forward", "backward", "optimizer"} for p in phases)
    assert all(v >= 0 for p in phases for v in p.values()) and all(p["forward"] > 0 for p in phases)
    losses = train_losses(run_dir)
    assert len(losses) == 6 and all(v == v and v < 1e6 for v in losses.values())
    m = read_manifest(run_dir / "artifact")
    assert m["config"]["kd"]["on_policy"]["lmbda"] == 0.5 and m["metrics"]["export_max_abs_logit_diff"] < 1e-3


def test_uld_across_tokenizers_through_the_cli(teacher, smollm2_dir, tmp_path):
    """kd.loss uld: a student with SmolLM2's tokenizer (49152 tokens) learns from the tiny teacher (a 512-token
    BPE trained on the fly). The data is tokenized with the student's tokenizer, the teacher re-tokenizes each
    batch, the loss compares sorted distributions on aligned tokens; the artifact carries the student's
    tokenizer. Without uld the same student is refused before anything starts."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydist.config import TinyModelSpec
    from raydist.core.models import save_model_dir, tiny_llama_config

    student_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    spec = TinyModelSpec(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
    student = AutoModelForCausalLM.from_config(tiny_llama_config(spec, vocab_size=len(student_tok)))
    student_dir = tmp_path / "student"
    save_model_dir(student, student_tok, student_dir)
    cfg = distill_cfg(teacher, tmp_path, loss="uld")
    cfg["student"] = {"source": "pretrained", "path": str(student_dir)}
    cfg["train"].update(max_steps=6, eval_every=None, checkpoint_every=None)
    with pytest.raises(PreflightError, match="kd.loss: uld"):
        run_distill(config_from_dict(DistillConfig, {**cfg, "kd": {"loss": "forward_kl"}}))
    cfg_file = tmp_path / "distill.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert main(["distill", "-c", str(cfg_file)]) == 0
    run_dir = tmp_path / "kd"
    losses = train_losses(run_dir)
    assert len(losses) == 6 and losses[6] < losses[1]
    m = read_manifest(run_dir / "artifact")
    assert math.isfinite(m["metrics"]["eval_ppl"]) and math.isnan(m["metrics"]["teacher_ppl"])
    assert len(AutoTokenizer.from_pretrained(run_dir / "artifact")) == len(student_tok)
