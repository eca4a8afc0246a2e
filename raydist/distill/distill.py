"""The distillation stage: `raydist distill`, teacher → student on Ray Train + DeepSpeed, read top to bottom.

Driver (``run_distill``): check teacher, student and data (shared vocabulary included), open or resume the
run directory, tokenize once, build the student once (pruned from the teacher on calibration data,
a pretrained model, or a random config) into ``run_dir/student_init``, then start the workers.

Worker (``distill_loop_per_worker``): the frozen teacher runs in inference mode in every worker (bf16 on
GPU); DeepSpeed wraps and shards only the student (plus the hidden-state projection when that loss is on).
Each micro-batch costs ``(1 - w)·KD + w·CE`` summed over the real target tokens and normalised by the
whole optimizer step's token count, plus the optional hidden-state loss. Evaluations report the student's
and the teacher's perplexity on the same held-out text and the fraction of the gap recovered. Resume,
failure recovery and export are the fine-tuning stage's (``TrainingSession``).

Over ~500 lines because the stage's driver and worker read top to bottom in one place; the parts that stand
alone live beside it (losses, on_policy, cross_tokenizer, teacher_cache).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from raydist.compress.structured import collect_importance, prune_model
from raydist.config.base import ModelConfig
from raydist.config.distill import DRAWN_ENTRIES, DistillConfig
from raydist.core import storage
from raydist.core.artifact import write_manifest
from raydist.core.data import IGNORE_INDEX
from raydist.core.evaluation import perplexity
from raydist.core.models import (
    hash_model_source,
    load_model,
    load_model_config,
    load_tokenizer,
    make_shareable,
    resolve_model_source,
    save_model_dir,
    tiny_llama_config,
)
from raydist.core.preflight import preflight_distill, shares_vocabulary
from raydist.core.progress import console, read_history
from raydist.core.resources import plan_units, unit_device
from raydist.core.runs import (
    finish_run,
    init_ray,
    open_run_dir,
    plan_training,
    read_parquet,
    tokenize_once,
    train_on_ray,
    with_absolute_paths,
)
from raydist.core.storage import Mirror, local_copy
from raydist.distill.cross_tokenizer import aligned_rows, retokenize, uld_loss_on_rows
from raydist.distill.losses import (
    HiddenProjection,
    default_layer_mapping,
    hidden_state_loss,
    kd_loss_on_rows,
    sampled_kd_loss_on_rows,
    topk_kd_loss_on_rows,
)
from raydist.distill.on_policy import is_on_policy, on_policy_batch
from raydist.distill.teacher_cache import (
    CACHE_MANIFEST,
    HEAD_FILE,
    cache_key,
    cache_table,
    check_cache,
    head_tensors,
    hidden_rows,
    load_head,
    payload_bytes_per_token,
    save_head,
    tokenizer_hash,
    topk_rows,
)
from raydist.train.export import export_artifact, logits_of, probe_batch
from raydist.train.plumbing import seed_everything
from raydist.train.worker import TrainingSession

ARTIFACT_DIR = "artifact"
STUDENT_INIT = "student_init"


# ----------------------------------------------------------------------------------------------- driver


def run_distill(cfg: DistillConfig, *, verbose: bool = True) -> Path:
    """Distill ``cfg.teacher`` into a student on ``cfg.data``; return the artifact directory.

    Raises:
        PreflightError / ConfigError / RunDirError: before any worker starts.
    """
    say = print if verbose else (lambda *a, **k: None)
    report, tokenizer = preflight_distill(cfg)
    cfg = with_absolute_paths(cfg)
    # what the cluster cannot place is refused before anything is written
    run_dir, resuming = open_run_dir(cfg, ARTIFACT_DIR, prepare=lambda: plan_training(cfg))
    say(f"[raydist] run dir: {run_dir.location} ({'resuming' if resuming else 'new run'})")
    student_tok = _own_student_tokenizer(cfg, tokenizer)
    cross = student_tok is not None
    data_model = cfg.teacher
    if cross:  # the student learns on its own tokens; the teacher gets its own in every step (cross_tokenizer.py)
        tokenizer, data_model = student_tok, ModelConfig(path=cfg.student.path)
        say("[raydist] student and teacher tokenizers differ: universal logit distillation on aligned tokens")
    counts = tokenize_once(run_dir, cfg.data, data_model, cfg.train.seed, tokenizer, say)
    if cfg.kd.on_policy.lmbda > 0:
        _check_prompts(run_dir.local)
    student_dir = build_student(cfg, run_dir, tokenizer, say)  # a path or, for remote storage, a URI
    teacher_src = resolve_model_source(cfg.teacher)
    extra = {
        "cross_tokenizer": cross,
        "student_dir": str(student_dir),
        "parent": {"kind": report.model_kind, "path": teacher_src.describe(), "role": "teacher"},
    }
    train_files = None
    if cfg.kd.teacher_mode == "cache":
        cache_dir, n_shards = build_teacher_cache(cfg, run_dir, tokenizer, say)
        train_files = [str(storage.join(cache_dir, shard_name(i))) for i in range(n_shards)]
        extra["teacher_cache"] = str(cache_dir)
    what = f"distilling ({cfg.kd.loss}, {cfg.kd.teacher_mode} teacher)"
    if cfg.kd.on_policy.lmbda > 0:
        op = cfg.kd.on_policy
        what += f", on-policy {op.loss} on {op.lmbda:g} of the batches"
        if op.start_step:
            what += f" from step {op.start_step + 1}"
    train_on_ray(distill_loop_per_worker, cfg, run_dir, counts, extra, say, what, train_files=train_files)
    return finish_run(run_dir, ARTIFACT_DIR, cfg.run.stop_after_steps, f"{run_dir.name} (distill)", say)


def _own_student_tokenizer(cfg: DistillConfig, teacher_tok):
    """The (pretrained) student's tokenizer when it differs from the teacher's (only kd.loss uld gets here then),
    else None."""
    if cfg.student.source != "pretrained" or cfg.kd.loss != "uld":
        return None
    student_tok = load_tokenizer(ModelConfig(path=cfg.student.path))
    return None if shares_vocabulary(teacher_tok, student_tok) else student_tok


def _check_prompts(run_dir: Path) -> None:
    """On-policy KD completes each training row's prompt: refuse data whose rows have none, before the workers."""
    import pyarrow.parquet as pq

    labels = pq.read_table(run_dir / "data" / "train.parquet", columns=["labels"]).column("labels").to_pylist()
    bad = sum(1 for row in labels if row and row[0] != IGNORE_INDEX)  # a target from the first token: no prompt
    if bad:
        raise ValueError(
            f"kd.on_policy: {bad} of {len(labels)} training rows have no prompt (no label -100 before their first "
            "target); on-policy distillation needs instruction or chat data"
        )


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def build_student(cfg: DistillConfig, run_dir: Mirror, tokenizer, say):
    """The student's initial weights as an HF directory, built once per run (a resume reuses it); returns its
    location (a path, or a URI when the run lives on remote storage)."""
    if cfg.student.source == "pretrained":
        return cfg.student.path
    out = run_dir.local / STUDENT_INIT
    if run_dir.exists(f"{STUDENT_INIT}/config.json"):
        return run_dir.at(STUDENT_INIT)
    tmp = Path(tempfile.mkdtemp(prefix=f".{STUDENT_INIT}.", dir=run_dir.local))
    summary: dict[str, Any] = {"source": cfg.student.source}
    if cfg.student.source == "config":
        from transformers import AutoModelForCausalLM

        vocab = load_model_config(cfg.teacher).vocab_size
        torch.manual_seed(cfg.train.seed)
        student = AutoModelForCausalLM.from_config(tiny_llama_config(cfg.student.tiny, vocab_size=vocab))
    else:
        student = load_model(cfg.teacher).eval()
        batches = _calibration_batches(run_dir.local, cfg.student.prune.calibration_batches, tokenizer.pad_token_id)
        importance = collect_importance(student, batches)
        p = cfg.student.prune
        summary.update(
            prune_model(
                student,
                importance,
                drop_layers=p.drop_layers,
                mlp_keep_ratio=p.mlp_keep_ratio,
                kv_groups_keep=p.kv_groups_keep,
                hidden_keep_ratio=p.hidden_keep_ratio,
                multiple_of=p.multiple_of,
            )
        )
    save_model_dir(student, tokenizer, tmp)
    (tmp / "student_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    make_shareable(tmp)
    os.replace(tmp, out)
    run_dir.push(STUDENT_INIT, last="config.json")  # config.json marks it complete
    n = sum(p.numel() for p in {id(p): p for p in student.parameters()}.values())
    say(f"[raydist] student ({cfg.student.source}): {n:,} parameters -> {run_dir.at(STUDENT_INIT)}")
    return run_dir.at(STUDENT_INIT)


class TeacherTopK:
    """A Ray Data actor holding one teacher replica; turns token rows into rows with top-k columns (or, for a
    ``last_hidden`` cache, the teacher's last hidden states)."""

    def __init__(self, cfg_json: dict[str, Any]):

        cfg = DistillConfig.model_validate(cfg_json)
        self.k, self.temperature = cfg.kd.top_k, cfg.kd.temperature
        self.entries, self.seed, self.tail_draws = cfg.kd.cache_entries, cfg.train.seed, cfg.kd.tail_draws
        self.pad_id = load_tokenizer(cfg.teacher).pad_token_id
        device = unit_device(cfg.resources.device, "teacher-cache actor")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = load_model(cfg.teacher, dtype=dtype).to(device).eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.entries == "last_hidden":
            cols = hidden_rows(self.model, list(batch["input_ids"]), self.pad_id)
            return {**batch, **{name: _object_array(v) for name, v in cols.items()}}
        cols = topk_rows(
            self.model,
            list(batch["input_ids"]),
            self.k,
            self.temperature,
            self.pad_id,
            entries=self.entries,
            seed=self.seed,
            tail_draws=self.tail_draws,
        )
        return {**batch, **{name: _object_array(v) for name, v in cols.items()}}


def _object_array(items: list) -> Any:
    import numpy as np

    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def build_teacher_cache(cfg: DistillConfig, run_dir: Mirror, tokenizer, say, rows_per_shard: int = 256):
    """Build (or reuse) the offline teacher cache with a Ray Data batch-inference job.

    The teacher runs on ``kd.cache_actors`` actors (a GPU each when present); rows come back in training
    order and are written as ``part-*.parquet`` shards into a temporary sibling directory, which is
    renamed to the cache directory only when complete (on remote storage: uploaded, its manifest last).

    Returns:
        ``(cache location, number of shards)``.

    Raises:
        CacheMismatchError: the directory holds a cache for another teacher / data / tokenizer / k / T.
    """
    import pyarrow.parquet as pq
    import ray

    src = resolve_model_source(cfg.teacher)
    key = cache_key(
        teacher_hash=hash_model_source(src, cfg.teacher),
        data_fingerprint=(run_dir.local / "data" / "fingerprint.txt").read_text(),
        tokenizer_hash=tokenizer_hash(tokenizer),
        top_k=cfg.kd.top_k,
        temperature=cfg.kd.temperature,
        precision=cfg.kd.cache_precision,
        entries=cfg.kd.cache_entries,
        seed=cfg.train.seed,
        tail_draws=cfg.kd.tail_draws,
    )
    cache = Mirror(cfg.kd.cache_dir or storage.join(cfg.run.output_dir, "teacher_cache", cfg.run.name))
    cache_dir = cache.local
    if cache.remote:
        cache.pull(CACHE_MANIFEST)
    if check_cache(cache_dir, key):
        say(f"[raydist] reusing teacher cache {cache.location}")
        return cache.location, json.loads((cache_dir / CACHE_MANIFEST).read_text())["shards"]
    init_ray(cfg.kd.cache_actors * cfg.resources.num_cpus)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # rows must stay in training order
    plan = plan_units(cfg.resources, cfg.kd.cache_actors, "teacher-cache actor")
    t0 = time.time()
    ds = read_parquet(run_dir.at("data", "train.parquet")).map_batches(
        TeacherTopK,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump(mode="json")},
        batch_size=cfg.kd.cache_batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.kd.cache_actors),
        num_gpus=plan.num_gpus,
        num_cpus=plan.num_cpus,
    )
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    n_rows = n_shards = 0
    k = cfg.kd.top_k
    model_config = load_model_config(cfg.teacher)
    vocab = model_config.vocab_size
    hidden_size = model_config.hidden_size if cfg.kd.cache_entries == "last_hidden" else None
    n_tokens = 0
    for batch in ds.iter_batches(batch_size=rows_per_shard, batch_format="numpy"):
        table = cache_table(batch, k, cfg.kd.cache_precision, vocab)
        pq.write_table(table, tmp / shard_name(n_shards))
        n_rows += len(table)
        n_tokens += sum(len(x) for x in batch["input_ids"])
        n_shards += 1
    if hidden_size is not None:  # the workers turn hidden states into logits with the teacher's own output layer
        save_head(head_tensors(cfg.teacher), tmp / HEAD_FILE)
    disk = sum(f.stat().st_size for f in tmp.glob("part-*.parquet"))
    sizes = {
        "tokens": n_tokens,
        "payload_bytes_per_token": payload_bytes_per_token(k, cfg.kd.cache_precision, vocab, hidden_size),
        "disk_bytes": disk,
        "disk_bytes_per_token": disk / max(n_tokens, 1),
    }
    if hidden_size is not None:  # once per cache, beside the per-token bytes
        sizes["head_bytes"] = (tmp / HEAD_FILE).stat().st_size
    manifest = {"key": key, "rows": n_rows, "shards": n_shards, **sizes}
    (tmp / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2))
    make_shareable(tmp)
    if cache.remote:
        storage.upload(tmp, cache.location, last=CACHE_MANIFEST)
        shutil.rmtree(tmp)
    else:
        if cache_dir.exists():
            cache_dir.rmdir()  # empty: check_cache refuses a non-empty directory without a manifest
        os.replace(tmp, cache_dir)  # the cache appears complete or not at all
    what = {
        "top_k": f"top-{k}",
        "sampled": f"{k} draws per token",
        "top_k_tail": f"top-{k - cfg.kd.tail_draws} + {cfg.kd.tail_draws} tail draws per token",
        "last_hidden": f"last hidden states ({hidden_size} values) per token",
    }[cfg.kd.cache_entries]
    values = "hidden states" if hidden_size is not None else "log-probabilities"
    head = f", output layer {sizes['head_bytes'] / 2**20:.0f} MiB" if "head_bytes" in sizes else ""
    say(
        f"[raydist] teacher cache: {n_rows} sequences, {what} ({cfg.kd.cache_precision} {values}, "
        f"{sizes['payload_bytes_per_token']} bytes per token, {sizes['disk_bytes_per_token']:.0f} on disk{head}), in "
        f"{time.time() - t0:.0f}s -> {cache.location}"
    )
    return cache.location, n_shards


def _calibration_batches(run_dir: Path, n: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` tokenized training sequences, one per batch (no padding to skew activations)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(run_dir / "data" / "train.parquet", columns=["input_ids"]).slice(0, n).to_pylist()
    return [{"input_ids": torch.tensor([r["input_ids"]])} for r in rows]


# ----------------------------------------------------------------------------------------------- worker


class DistillStudent(torch.nn.Module):
    """The student (plus the learned hidden-state projection when that loss is on) as the one module
    DeepSpeed wraps, optimises and checkpoints; only ``student.*`` weights are exported.

    ``forward(..., target_mask=m)`` runs the decoder and applies the LM head only at the positions ``m``
    selects (prompt and padding positions never reach the [H, V] vocabulary projection, the biggest
    single matmul of a small model); without ``target_mask`` it is the student's own forward (eval,
    export probe).
    """

    def __init__(self, student: torch.nn.Module, projection: torch.nn.Module | None = None):
        super().__init__()
        self.student = student
        self.projection = projection

    def forward(self, target_mask: torch.Tensor | None = None, **kwargs):
        if target_mask is None:
            return self.student(**kwargs)
        return logits_at_targets(self.student, target_mask, **kwargs)


def logits_at_targets(
    model: torch.nn.Module, target_mask: torch.Tensor, *, input_ids, attention_mask, output_hidden_states: bool = False
):
    """``(logits [N, V], hidden_states or None)`` of a causal LM at the N positions t where
    ``target_mask[:, t]`` ([B, T-1], True where token t+1 is a target) holds."""
    out = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states
    )
    rows = out.last_hidden_state[:, :-1][target_mask]  # [N, H]
    return model.get_output_embeddings()(rows), out.hidden_states  # [N, V]


def kd_head_dtype(setting: str | None, bf16: bool) -> torch.dtype:
    """The dtype of a ``last_hidden`` cache's teacher output layer in the workers (``kd.cache_head_dtype``;
    default: the training's)."""
    if setting is None:
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


def distill_loop_per_worker(config: dict[str, Any]) -> None:
    """One data-parallel rank: frozen teacher, DeepSpeed-wrapped student, KD loss, eval with gap recovered."""
    cfg = DistillConfig.model_validate(config["cfg"])
    seed_everything(cfg.train.seed)
    cross = bool(config.get("cross_tokenizer"))
    # the data's tokenizer: the student's own when the two differ (the teacher re-tokenizes every batch)
    tokenizer = load_tokenizer(ModelConfig(path=cfg.student.path) if cross else cfg.teacher)
    teacher_tok = load_tokenizer(cfg.teacher) if cross else None
    session = TrainingSession(config, cfg, pad_id=tokenizer.pad_token_id)
    device = session.device

    def load_teacher():
        # The teacher is not a DeepSpeed module: each rank holds a frozen copy and runs it without grad.
        t = load_model(cfg.teacher, dtype=torch.bfloat16 if session.bf16 else torch.float32)
        return t.to(device).eval().requires_grad_(False)

    cached = cfg.kd.teacher_mode == "cache"
    teacher = None if cached else load_teacher()
    teacher_head = None  # a hidden cache's teacher output layer: the exact logits from the stored hidden states
    if cached and cfg.kd.cache_entries == "last_hidden":
        head_file = Mirror(config["teacher_cache"], role=f"rank{session.rank}").pull(HEAD_FILE)
        head_dtype = kd_head_dtype(cfg.kd.cache_head_dtype, session.bf16)
        teacher_head = load_head(head_file, device, head_dtype)
    teacher_config = load_model_config(cfg.teacher)
    student = load_model(ModelConfig(path=config["student_dir"]), seed=cfg.train.seed)
    hidden = cfg.kd.hidden
    mapping = None
    projection = None
    if hidden.weight > 0:
        mapping = (
            [tuple(p) for p in hidden.mapping]
            if hidden.mapping
            else default_layer_mapping(student.config.num_hidden_layers, teacher_config.num_hidden_layers)
        )
        projection = HiddenProjection(student.config.hidden_size, teacher_config.hidden_size, len(mapping))
    engine = session.build_engine(DistillStudent(student, projection))
    session.restore()

    kd = cfg.kd
    w = kd.ce_weight
    scale = session.world * cfg.train.grad_accum_steps
    want_hidden = mapping is not None

    op = kd.on_policy
    zero_stage = engine.zero_optimization_stage()
    teacher_pad, teacher_ctx = None, None
    if cross:
        teacher_ctx = int(getattr(teacher_config, "max_position_embeddings", 0) or 0) or None
        teacher_pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id

    def loss_fn(b: dict[str, torch.Tensor], step_targets: int) -> torch.Tensor:
        on_policy = session.step >= op.start_step and is_on_policy(cfg.train.seed, session.micro, op.lmbda)
        if on_policy:  # the student completes the prompts; the teacher scores the student's tokens
            b = on_policy_batch(
                engine.module.student,
                b,
                max_new_tokens=op.max_new_tokens,
                temperature=op.temperature,
                pad_id=tokenizer.pad_token_id,
                eos_id=tokenizer.eos_token_id,
                seed=cfg.train.seed * 1_000_003 + session.micro,
                zero_stage=zero_stage,
            )
            completion_tokens = int((b["labels"] != -100).sum())
            session.log(
                {
                    "event": "on_policy",
                    "step": session.step + 1,
                    "micro": session.micro,
                    "completion_tokens": completion_tokens,
                }
            )
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        targets = b["labels"][:, 1:] != -100  # [B, T-1]: logits at t predict token t+1
        s_logits, s_hidden = engine(target_mask=targets, output_hidden_states=want_hidden, **inputs)  # [N, V]
        t_hidden = None
        if on_policy:
            with torch.no_grad():
                t_logits, t_hidden = logits_at_targets(teacher, targets, output_hidden_states=want_hidden, **inputs)
            kd_sum = kd_loss_on_rows(s_logits, t_logits, kind=op.loss, temperature=kd.temperature, beta=op.beta)
            # The step's target count is the dataset's; these are the student's tokens: a per-token mean of this
            # micro-batch, which DeepSpeed's mean over micro-batches and ranks weighs like the others.
            loss = kd_sum / max(int(targets.sum()), 1)
        elif kd.loss == "uld":  # sorted distributions, aligned target tokens (cross_tokenizer.py)
            tb = retokenize(b, tokenizer, teacher_tok, teacher_pad, teacher_ctx) if cross else b
            t_targets = tb["labels"][:, 1:] != -100
            with torch.no_grad():
                t_inputs = {"input_ids": tb["input_ids"], "attention_mask": tb["attention_mask"]}
                t_logits, _ = logits_at_targets(teacher, t_targets, **t_inputs)
            si, ti = aligned_rows(targets, t_targets)
            kd_sum = uld_loss_on_rows(s_logits[si.to(device)], t_logits[ti.to(device)], temperature=kd.temperature)
        elif w == 1 and not want_hidden:  # pure cross-entropy: the teacher is not needed at all
            kd_sum = s_logits.new_zeros(())
        elif teacher_head is not None:  # the teacher's exact logits from its cached last hidden states
            with torch.no_grad():
                t_logits = teacher_head(b["teacher_hidden"][:, :-1][targets].to(teacher_head.weight.dtype))
            kd_sum = kd_loss_on_rows(s_logits, t_logits, kind=kd.loss, temperature=kd.temperature, beta=kd.beta)
        elif cached and kd.cache_entries in DRAWN_ENTRIES:  # the teacher's distribution estimated from draws
            kd_sum = sampled_kd_loss_on_rows(
                s_logits,
                b["topk_logprobs"][:, :-1][targets],
                b["topk_indices"][:, :-1][targets],
                temperature=kd.temperature,
            )
        elif cached:  # the teacher's stored top-k, with the missing mass as one extra bucket
            kd_sum = topk_kd_loss_on_rows(
                s_logits,
                b["topk_logprobs"][:, :-1][targets],
                b["topk_indices"][:, :-1][targets],
                b["rest_mass"][:, :-1][targets],
                kind=kd.loss,
                temperature=kd.temperature,
                beta=kd.beta,
            )
        else:
            with torch.no_grad():
                t_logits, t_hidden = logits_at_targets(teacher, targets, output_hidden_states=want_hidden, **inputs)
            kd_sum = kd_loss_on_rows(s_logits, t_logits, kind=kd.loss, temperature=kd.temperature, beta=kd.beta)
        if not on_policy:
            total = (1 - w) * kd_sum
            if w > 0:
                total = total + w * torch.nn.functional.cross_entropy(
                    s_logits.float(), b["labels"][:, 1:][targets], reduction="sum"
                )
            # Summed over tokens, scaled so DeepSpeed's mean over ranks and micro-batches is a per-token mean.
            loss = total * scale / max(step_targets, 1)
        if want_hidden:
            proj = engine.module.projection
            loss = loss + hidden.weight * hidden_state_loss(
                list(s_hidden), list(t_hidden), mapping, proj, b["attention_mask"], kind=hidden.kind
            )
        return loss

    teacher_metrics: dict[str, float] = {}

    def eval_fn() -> dict[str, float]:
        m = session.model_eval()
        if not teacher_metrics and cross:  # per-token figures of two tokenizations do not compare
            teacher_metrics.update(teacher_loss=float("nan"), teacher_ppl=float("nan"))
        if not teacher_metrics:  # the teacher is frozen: measure it once
            nll, n = session.nll_of(teacher if teacher is not None else load_teacher())
            teacher_metrics.update(teacher_loss=nll / n, teacher_ppl=perplexity(nll, n))
        m.update(teacher_metrics)
        start = session.first_eval or _first_eval_in_history(session.run_dir) or m
        gap = start["eval_ppl"] - m["teacher_ppl"]
        m["gap_recovered"] = (start["eval_ppl"] - m["eval_ppl"]) / gap if gap > 0 else float("nan")
        return m

    finished = session.run(loss_fn, eval_fn)
    if finished:
        _export(session, cfg, config, tokenizer, teacher_metrics)


def _first_eval_in_history(run_dir: Path):
    evals = [h for h in read_history(run_dir / "metrics.jsonl") if "eval_ppl" in h]
    return evals[0] if evals else None


def _export(session: TrainingSession, cfg: DistillConfig, config: dict[str, Any], tokenizer, teacher_metrics) -> None:
    """Gather the student's weights on rank 0, write + verify the artifact (all ranks must call this)."""
    import ray.train

    student_dir = local_copy(config["student_dir"])
    student_config = load_model_config(ModelConfig(path=str(student_dir)))
    probe = probe_batch(student_config.vocab_size)
    session.engine.eval()
    reference = logits_of(session.engine.module, probe)  # a collective forward under ZeRO-3
    state = session.gather_state()
    metrics: dict[str, Any] = {}
    if session.rank == 0:
        if any(k.startswith("student.") for k in state):
            state = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
        metrics = session.summary_metrics()
        if cfg.student.source == "pruned":  # the pruned student's quality before any training
            metrics["pruned_before_training_ppl"] = metrics.get("eval_ppl_before")
        metrics.update(teacher_metrics)
        out = session.run_dir / ARTIFACT_DIR  # local; published to the run's location below
        info = export_artifact(
            state,
            base_config=student_config,
            tokenizer=tokenizer,
            lora=None,
            out_dir=out,
            reference_logits=reference,
            probe=probe,
            atol=1e-3 if next(iter(state.values())).dtype == torch.float32 else 5e-2,
        )
        metrics["export_max_abs_logit_diff"] = info["export_max_abs_logit_diff"]
        src = resolve_model_source(cfg.teacher)
        summary_file = student_dir / "student_summary.json"
        write_manifest(
            out,
            stage="distill",
            config=config["cfg"],
            parent={**config["parent"], "hash": hash_model_source(src, cfg.teacher)},
            metrics=metrics,
            num_parameters=info["num_parameters"],
            extra={
                "student": json.loads(summary_file.read_text())
                if summary_file.is_file()
                else {"source": "pretrained", "path": str(student_dir)},
                "teacher_mode": cfg.kd.teacher_mode,
                **({"cross_tokenizer": True} if config.get("cross_tokenizer") else {}),
                **({"teacher_cache": config["teacher_cache"]} if "teacher_cache" in config else {}),
            },
        )
        session.publish(ARTIFACT_DIR)
        console(
            f"[raydist] exported {session.storage.at(ARTIFACT_DIR)} ({info['num_parameters']:,} parameters; "
            f"gap recovered {metrics.get('gap_recovered', float('nan')):.2f})"
        )
    ray.train.report({"step": session.total_steps, "exported": 1, **metrics})
