"""One GPU, one run: raydist's fine-tune loop (tokens/s, peak memory, MFU), its overhead against a hand-written
DeepSpeed loop, the host share of a distillation step, and quantized generation (issue 13, GPU part).

On a lent GPU machine (Python 3.12 with torch / transformers / peft, no network). Prepare here, once per
checkout, the wheels it lacks (Ray, DeepSpeed, datasets, ... by the shared script; torchao, compressed-tensors and
loguru are raydist dependencies that script does not carry)::

    bash ../shared/gpu/pack-wheels.sh && python3 -m pip download -q --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform any -d .whl \
      torchao==0.18.0 compressed-tensors==0.20.1 loguru==0.7.3

then one ``run`` call (carry ``[".whl"]``, timeout_s 600; put this checkout's ``git rev-parse HEAD`` in
BENCH_GIT_COMMIT, the GPU machine gets the tree without ``.git``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD RAY_TMPDIR=/tmp/r-gpu BENCH_GIT_COMMIT=<commit> BENCH_GIT_DIRTY=0 && timeout 540 python3 scripts/bench/gpu.py --out $OUT

and back here: copy the returned ``gpu.json`` to ``benchmarks/results/gpu.json`` and run
``.venv/bin/python scripts/bench/gpu.py --markdown-only`` (writes the "GPU" section of BENCHMARKS.md). Run on
the GPU without ``--out``, the script writes ``benchmarks/results/gpu.json`` itself (and the section with
``--update-benchmarks-md``). About 4-6 min on an H100/H200 (estimate: no run of this script on a GPU yet).

The GPU machines cannot reach the hub, so every model is random-initialised from a ``transformers.LlamaConfig``
of the real model's shape, with raydist's tiny BPE tokenizer (its 512 ids index the first rows of the 49,152-row
embedding). Speed depends on shapes, not on weight values; no quality is reported.

Parts (``--parts``; each records ``{"error": ...}`` and the others still run when it fails):

finetune
    SmolLM2-360M's shape (hidden 960, MLP 2560, 32 layers, 15 heads / 5 KV heads, vocab 49,152, tied
    embeddings), full fine-tune, bf16 under DeepSpeed ZeRO-2, one GPU, packed 2048-token sequences (the pydoc
    corpus repeated to 1.2 x what the run reads: no epoch boundary falls inside it), micro batch 8, 30 steps, run
    twice, as in ``finetune_overhead.py`` and with its helpers:
      (a) the hand-written DeepSpeed loop ``_ds_baseline_loop.py`` under torchrun (``run_baseline``), then
      (b) raydist: ``run_finetune`` = Ray Train + Ray Data + raydist's worker loop (``run_raydist_overhead``).
    Step time = median gap between consecutive per-step timestamps past the first ``WARMUP_STEPS``.
      tokens/s       = micro batch x seq_len / median step time
      MFU            = tokens/s x FLOPs per token / the card's bf16 matmul rate measured in this run (8192 x
                       8192 x 8192 ``torch.matmul``, ``torch.utils.benchmark.Timer`` for 2 s, median; once before
                       and once after the training runs, the higher counts)
      FLOPs per token = 6 N + 12 L h s  (N: weights of every matmul, i.e. all ``nn.Linear`` weights including
                       the tied LM head, not the embedding lookup; 12 L h s: attention scores and weighted sum,
                       forward + backward, the PaLM paper's estimate, counting the full (not causal) s x s; a
                       formula rather than torch.utils.flop_counter so that the figure is the usual MFU convention)
      peak memory    = ``torch.cuda.max_memory_allocated`` of the training process (raydist: the worker reports
                       it after its run, export included; the hand-written loop: after its last step)
      overhead ratio = raydist median step time / hand-written median step time
    Goals: MFU >= 45 %, overhead ratio <= 1.05.
distill
    ``distill_gpu.py``'s online run (``distill_gpu.run``: ``run_distill``, one Ray Train GPU worker, ZeRO-2, bf16
    student + bf16 teacher in inference mode, student pruned from the teacher, forward KL), teacher
    SmolLM2-135M-shaped; 24 steps of 16 x 512 tokens. The step's arithmetic is then replayed in this process on
    the same shapes with the batch already on the GPU: the trained student (the run's artifact) in the same
    DeepSpeed engine config, raydist's ``DistillStudent`` / ``logits_at_targets`` / ``kd_loss_on_rows``, the
    teacher's forward, backward and optimizer step, CUDA-synchronised, median of 10 after 3 warm-up steps.
      host share = 1 - replayed arithmetic step time / raydist's median step time   (goal < 20 %)
    (what the replay leaves out is host work: Ray Data blocks to tensors, copies, logging, per-step syncs.)
generation
    SmolLM2-360M-shaped model, bf16, each artifact written by raydist and loaded back through
    ``load_compressed``: dense (``save_compressed`` of the float model), int8 weight-only and int4 weight-only
    (group 64) quantized by ``quantize_model`` with the device's kernels. Greedy decoding through raydist's serving
    engine (``BatchGenerator``, via ``generation_speed(engine="serve")``): 64 random prompt tokens, exactly 64 new
    tokens, batch 1 and 16, median of 3 after a warm-up. If ``vllm`` is importable, vLLM loads the int4
    compressed-tensors artifact (subprocess) and the same prompts are timed; otherwise "vllm not installed".

``--cpu`` (automatic without CUDA) runs every part with tiny shapes (hidden 64, 2 layers, seq 64, 6 steps, fp32,
gloo, ZeRO-2 on DeepSpeed's CPU accelerator, 4 new tokens) to exercise the script; it writes nothing unless
``--out`` is given (``tests/integration/test_gpu_bench_cpu_mode.py``). A benchmark, not a test; never imported
by raydist.
"""  # noqa: E501 (the device command above is one line on purpose: it is pasted as is)

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (scripts/bench is not a package)
    BENCHMARKS_MD,
    REPO,
    RESULTS_DIR,
    machine_line,
    machine_of,
    md_table,
    provenance,
    provenance_line,
    replace_section,
    say,
    versions_line,
    versions_of,
)

RESULTS = RESULTS_DIR / "gpu.json"
SECTION_PREFIX = "## GPU:"
COMMAND = "python3 scripts/bench/gpu.py --out $OUT"
PARTS = ("finetune", "distill", "generation")
GOALS = {"mfu_min": 0.45, "overhead_ratio_max": 1.05, "host_share_max": 0.20}
PEAK_FILE = "bench_peak_memory.json"  # written by the wrapped worker into the run directory

# Llama shapes of the real models (random weights); bos/eos/pad ids are the tiny tokenizer's.
_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": True}
SMOLLM2_360M = {
    "hidden_size": 960,
    "intermediate_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
}
SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}

SETTINGS = {
    "gpu": {
        "model": SMOLLM2_360M,
        "teacher": SMOLLM2_135M,
        "dtype": "bf16",
        "ft_seq_len": 2048,
        "ft_micro": 8,
        "ft_steps": 30,
        "cpus_per_worker": 4,
        "matmul_n": 8192,
        "matmul_min_run_time_s": 2.0,
        "distill_seq_len": 512,
        "distill_micro": 16,
        "distill_steps": 24,
        "replay_warmup": 3,
        "replay_steps": 10,
        "gen_prompt": 64,
        "gen_new_tokens": 64,
        "gen_repeats": 3,
        "gen_batches": [1, 16],
    },
    "cpu": {
        "model": TINY,
        "teacher": {**TINY, "num_hidden_layers": 12},  # distill_gpu's pruning recipe drops 10 layers
        "dtype": "fp32",
        "ft_seq_len": 64,
        "ft_micro": 2,
        "ft_steps": 6,
        "cpus_per_worker": 1,
        "matmul_n": 256,
        "matmul_min_run_time_s": 0.2,
        "distill_seq_len": 64,
        "distill_micro": 2,
        "distill_steps": 5,
        "replay_warmup": 1,
        "replay_steps": 2,
        "gen_prompt": 8,
        "gen_new_tokens": 4,
        "gen_repeats": 1,
        "gen_batches": [1, 16],
    },
}


# ----------------------------------------------------------------------------------------------- helpers


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, dtype, n: int, min_run_time_s: float) -> dict[str, Any]:
    """FLOP/s of an ``n x n x n`` ``torch.matmul`` in ``dtype``: ``torch.utils.benchmark.Timer`` (it synchronises
    CUDA around each block of calls) for ``min_run_time_s``, median block: the rate the card sustains for a large,
    well-shaped GEMM."""
    import torch
    from torch.utils.benchmark import Timer

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=c)  # warm-up: cuBLAS handle and heuristics
    m = Timer("torch.matmul(a, b, out=c)", globals={"torch": torch, "a": a, "b": b, "c": c}).blocked_autorange(
        min_run_time=min_run_time_s
    )
    del a, b, c
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "calls": m.number_per_run * len(m.times),
        "median_s": m.median,
        "flops_per_s": 2 * n**3 / m.median,
    }


def make_shape_dir(path: Path, shape: dict[str, int]) -> Path:
    """A directory with a Llama ``config.json`` of ``shape`` and raydist's tiny tokenizer (what
    ``distill_gpu.build_teacher`` turns into a random-weight model directory)."""
    from transformers import LlamaConfig

    from raydist.core.models import tiny_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**shape, **_IDS).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def flops_per_token(model_dir: Path, seq_len: int) -> dict[str, Any]:
    """Training FLOPs per token, 6 N + 12 L h s (see the module doc); N counted on a meta-device copy."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n_params = sum(p.numel() for p in model.parameters())  # tied weights once
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return {
        "parameters": n_params,
        "matmul_parameters": n_matmul,
        "attention_flops_per_token": attention,
        "flops_per_token": 6 * n_matmul + attention,
        "formula": "6 * N_matmul + 12 * layers * hidden * seq_len (N_matmul: all nn.Linear weights incl. the tied "
        "LM head; attention: QK^T and AV, forward + backward, full s x s)",
    }


def _loop_with_peak_memory(config: dict[str, Any]) -> None:
    """raydist's fine-tune worker (``train_loop_per_worker``) unchanged; afterwards rank 0 writes the process's
    peak memory into the run directory (the driver cannot read a worker's CUDA allocator)."""
    import json as _json
    import resource
    from pathlib import Path as _Path

    import ray.train
    import torch

    from raydist.train.finetune import train_loop_per_worker

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_loop_per_worker(config)
    if ray.train.get_context().get_world_rank() == 0:
        if cuda:
            rec = {"kind": "torch.cuda.max_memory_allocated", "bytes": torch.cuda.max_memory_allocated()}
        else:
            rec = {"kind": "peak RSS (ru_maxrss)", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        (_Path(config["run_dir"]) / PEAK_FILE).write_text(_json.dumps(rec))


# ----------------------------------------------------------------------------------------------- parts


def part_finetune(ctx: SimpleNamespace) -> dict[str, Any]:
    import finetune_overhead as fo
    from transformers import AutoTokenizer

    from raydist.config.finetune import FinetuneConfig
    from raydist.core.data import pydoc_topics_text

    s, work = ctx.s, ctx.work
    base = ctx.model_dir()
    seq, mb, steps = s["ft_seq_len"], s["ft_micro"], s["ft_steps"]
    # Packed blocks of real text, enough for every step within one epoch (an epoch boundary makes Ray Data
    # re-read the dataset inside a step) and for the hand-written loop, which refuses to run short; 20 % spare.
    text = pydoc_topics_text()
    chars_per_token = len(text) / len(AutoTokenizer.from_pretrained(base)(text)["input_ids"])
    chars = int(1.2 * steps * mb * seq * chars_per_token) + 4096
    train_txt = work / "train.txt"
    train_txt.write_text(("\n\n".join([text] * (chars // len(text) + 1)))[:chars])
    cfg = FinetuneConfig.model_validate(
        {
            "model": {"path": str(base)},
            "data": {"train": {"path": str(train_txt)}, "seq_len": seq, "eval_fraction": 0.0},
            "lora": {"enabled": False},
            "optim": {"lr": 1e-5, "schedule": "constant", "grad_clip": 1.0},
            "train": {
                "max_steps": steps,
                "micro_batch_size": mb,
                "grad_accum_steps": 1,
                "eval_at_start": False,
                "eval_every": None,
                "checkpoint_every": None,
                "keep_checkpoints": 1,
            },
            "deepspeed": {"zero_stage": 2},
            "scaling": {"num_workers": 1},
            "resources": {"num_cpus": s["cpus_per_worker"], "num_gpus": 1 if ctx.gpu else 0},
            "run": {"name": "gpu-finetune", "output_dir": str(work / "runs"), "resume": "never", "max_failures": 0},
        }
    )
    flops = flops_per_token(base, seq)
    tokens_per_step = mb * seq * cfg.scaling.num_workers * cfg.train.grad_accum_steps
    hand = fo.run_baseline(cfg, work, "gpu")
    with mock.patch("raydist.train.finetune.train_loop_per_worker", _loop_with_peak_memory):
        ray_side = fo.run_raydist_overhead(cfg)
    peak = json.loads((Path(cfg.run.output_dir) / cfg.run.name / PEAK_FILE).read_text())
    ctx.rates.append(matmul_rate(ctx.device, ctx.dtype, s["matmul_n"], s["matmul_min_run_time_s"]))  # after, too
    rate = max(r["flops_per_s"] for r in ctx.rates)

    def side(run: dict[str, Any], peak_bytes: Optional[int], peak_kind: str) -> dict[str, Any]:
        step = fo.steady_median(run["gaps"])
        tok_s = tokens_per_step / step
        return {
            "median_step_s": step,
            "tokens_per_s": tok_s,
            "achieved_flops_per_s": tok_s * flops["flops_per_token"],
            "mfu": tok_s * flops["flops_per_token"] / rate,
            "peak_memory_bytes": peak_bytes,
            "peak_memory_kind": peak_kind,
            "steps_timed": sum(1 for k in run["gaps"] if k > fo.WARMUP_STEPS),
            "gaps_s": {str(k): round(v, 5) for k, v in sorted(run["gaps"].items())},
            "losses": run["losses"],
            "wall_s": run["wall_s"],
        }

    raydist = side(ray_side, peak["bytes"], peak["kind"])
    hand_kind = "torch.cuda.max_memory_allocated" if ctx.gpu else "not measured on CPU"
    hand_side = side(hand, hand.get("peak_memory_bytes"), hand_kind)
    return {
        "model": {"shape": s["model"], **flops},
        "tokens_per_step": tokens_per_step,
        "seq_len": seq,
        "micro_batch": mb,
        "steps": steps,
        "warmup_steps_dropped": fo.WARMUP_STEPS,
        "matmul_flops_per_s": rate,
        "raydist": raydist,
        "hand_written": hand_side,
        "overhead_ratio": raydist["median_step_s"] / hand_side["median_step_s"],
        "goal_mfu_met": raydist["mfu"] >= GOALS["mfu_min"],
        "goal_overhead_met": raydist["median_step_s"] / hand_side["median_step_s"] <= GOALS["overhead_ratio_max"],
    }


def replay_distill_arithmetic(ctx: SimpleNamespace, teacher_dir: Path, student_dir: Path) -> dict[str, Any]:
    """The distillation step's device work without its host work: raydist's own pieces (DistillStudent in the
    same DeepSpeed config, logits_at_targets, kd_loss_on_rows) on a batch already on the device."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from raydist.config.base import DeepSpeedSettings, ModelConfig, OptimConfig
    from raydist.core.models import load_model
    from raydist.core.runs import free_port
    from raydist.distill.distill import DistillStudent, logits_at_targets
    from raydist.distill.losses import kd_loss_on_rows
    from raydist.train.plumbing import adamw, deepspeed_config, param_groups

    s, device, cuda = ctx.s, ctx.device, ctx.gpu
    mb, seq = s["distill_micro"], s["distill_seq_len"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    try:
        teacher = load_model(ModelConfig(path=str(teacher_dir)), dtype=ctx.dtype).to(device).eval()
        teacher.requires_grad_(False)
        student = DistillStudent(load_model(ModelConfig(path=str(student_dir))))
        optimizer = adamw(param_groups(student, 0.0), OptimConfig(lr=1e-4))
        engine, _, _, _ = deepspeed.initialize(
            model=student,
            optimizer=optimizer,
            config=deepspeed_config(
                DeepSpeedSettings(zero_stage=2), micro_batch_size=mb, grad_accum_steps=1, grad_clip=1.0, bf16=cuda
            ),
        )
        engine.train()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, 512, (mb, seq), generator=g).to(device)  # the tiny tokenizer's ids, as in training
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        targets = torch.ones(mb, seq - 1, dtype=torch.bool, device=device)  # packed text: every position a target
        n_targets = int(targets.sum())
        times = []
        for i in range(s["replay_warmup"] + s["replay_steps"]):
            sync(device)
            t0 = time.perf_counter()
            s_logits, _ = engine(target_mask=targets, **inputs)
            with torch.no_grad():
                t_logits, _ = logits_at_targets(teacher, targets, **inputs)
            # forward KL at temperature 1, what distill_gpu.run configures
            loss = kd_loss_on_rows(s_logits, t_logits, kind="forward_kl", temperature=1.0) / n_targets
            engine.backward(loss)
            engine.step()
            loss.item()  # the raydist loop reads the loss every micro-batch too
            sync(device)
            if i >= s["replay_warmup"]:
                times.append(time.perf_counter() - t0)
        del engine, optimizer, student, teacher
    finally:
        dist.destroy_process_group()
        if cuda:
            torch.cuda.empty_cache()
    return {"median_step_s": statistics.median(times), "steps_s": times}


def part_distill(ctx: SimpleNamespace) -> dict[str, Any]:
    import distill_gpu
    import finetune_overhead as fo

    from raydist.distill.distill import ARTIFACT_DIR

    s, work = ctx.s, ctx.work
    teacher = distill_gpu.build_teacher(make_shape_dir(work / "teacher-shape", s["teacher"]), work / "teacher")
    args = SimpleNamespace(
        seq_len=s["distill_seq_len"], micro=s["distill_micro"], steps=s["distill_steps"], top_k=64, use_gpu=ctx.gpu
    )
    runs = work / "distill-runs"
    run = distill_gpu.run("online", teacher, args, runs)
    fo.shutdown_ray()  # the replay below has the device to itself
    student = runs / "gpu-online" / ARTIFACT_DIR
    replay = replay_distill_arithmetic(ctx, teacher, student)
    step = run["median_step_s"]
    arithmetic = replay["median_step_s"]
    host = min(1.0, max(0.0, 1.0 - arithmetic / step))
    return {
        "teacher": {"shape": s["teacher"], "parameters": distill_gpu._teacher_parameters(teacher)},
        "student_parameters": run.get("num_parameters"),
        "settings": {"micro_batch": args.micro, "seq_len": args.seq_len, "steps": args.steps, "loss": "forward_kl"},
        "raydist": run,
        "replay": replay,
        "step_s": step,
        "arithmetic_step_s": arithmetic,
        "arithmetic_share": 1.0 - host,
        "host_share": host,
        "goal_host_share_met": host < GOALS["host_share_max"],
    }


def _artifact_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def part_generation(ctx: SimpleNamespace) -> dict[str, Any]:
    import importlib.util

    import torch
    from transformers import AutoTokenizer

    from raydist.compress.quant.format import load_compressed, save_compressed
    from raydist.compress.quant.quantize import quantize_model, quantized_layers
    from raydist.sweep.speed import generation_speed

    s, work, device = ctx.s, ctx.work, ctx.device
    base = ctx.model_dir()
    tok = AutoTokenizer.from_pretrained(base)
    variants = {"dense": (None, None), "int8": ("int8_weight_only", None), "int4": ("int4_weight_only", 64)}
    rows: dict[str, Any] = {}
    for name, (scheme, group) in variants.items():
        try:
            model = load_compressed(base, device, dtype=ctx.dtype)
            report = quantize_model(model, scheme, group_size=group, device=device) if scheme else None
            art = work / f"gen-{name}"
            save_compressed(model, tok, art, report)
            del model
            model = load_compressed(art, device, dtype=ctx.dtype)
            row: dict[str, Any] = {
                "scheme": scheme or "none",
                "group_size": group,
                "artifact_bytes": _artifact_bytes(art),
            }
            for b in s["gen_batches"]:
                sp = generation_speed(
                    model,
                    batch_size=b,
                    prompt_len=s["gen_prompt"],
                    new_tokens=s["gen_new_tokens"],
                    repeats=s["gen_repeats"],
                    warmup=1,
                    tokenizer=tok,
                    engine="serve",
                )
                row[f"tokens_per_s_b{b}"] = sp["tokens_per_s"]
                row[f"seconds_b{b}"] = sp["seconds_all"]
            layers = quantized_layers(model).values()
            row["kernels"] = sorted({m.kernel for m in layers}) or ["dense"]
            notes = sorted({m.note for m in layers if m.note})
            if notes:
                row["kernel_notes"] = notes
            rows[name] = row
            say(f"generation {name}: " + json.dumps({k: v for k, v in row.items() if not k.startswith("seconds")}))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - a row that fails is reported, the others still run
            traceback.print_exc()
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
    dense = rows.get("dense", {})
    for row in rows.values():
        for b in s["gen_batches"]:
            if f"tokens_per_s_b{b}" in row and f"tokens_per_s_b{b}" in dense:
                row[f"vs_dense_b{b}"] = row[f"tokens_per_s_b{b}"] / dense[f"tokens_per_s_b{b}"]
    out: dict[str, Any] = {
        "settings": {k: s[k] for k in ("gen_prompt", "gen_new_tokens", "gen_repeats", "gen_batches")},
        "engine": "raydist.serve.engine.BatchGenerator (generation_speed engine='serve'), greedy, EOS ignored",
        "rows": rows,
    }
    if importlib.util.find_spec("vllm") is None:
        out["vllm"] = {"skipped": "vllm not installed"}
    elif "error" in rows.get("int4", {"error": ""}):
        out["vllm"] = {"skipped": "no int4 artifact (its row failed)"}
    else:
        out["vllm"] = run_vllm(ctx, work / "gen-int4")
    return out


def run_vllm(ctx: SimpleNamespace, artifact: Path) -> dict[str, Any]:
    """vLLM on the compressed-tensors artifact, in a child process (it owns the GPU memory it reserves)."""
    s = ctx.s
    result = ctx.work / "vllm.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--vllm-child", str(artifact), "--vllm-result", str(result)]
    cmd += [
        "--vllm-shape",
        json.dumps({k: s[k] for k in ("gen_prompt", "gen_new_tokens", "gen_repeats", "gen_batches")}),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return {"error": "vLLM child timed out (240 s)"}
    if proc.returncode or not result.is_file():
        return {"error": f"vLLM child exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
    return json.loads(result.read_text())


def vllm_child(artifact: str, result: str, shape: dict[str, Any]) -> None:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    prompt, new = shape["gen_prompt"], shape["gen_new_tokens"]
    llm = LLM(model=artifact, dtype="bfloat16", gpu_memory_utilization=0.4, max_model_len=prompt + new + 16, seed=0)
    vocab = json.loads((Path(artifact) / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)  # same kind of prompts as generation_speed: random ids past the specials
    ids = torch.randint(min(16, vocab - 1), vocab, (max(shape["gen_batches"]), prompt), generator=g).tolist()
    params = SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True, temperature=0.0)
    out: dict[str, Any] = {"vllm": vllm.__version__, "artifact": Path(artifact).name}
    for b in shape["gen_batches"]:
        prompts = [{"prompt_token_ids": row} for row in ids[:b]]
        llm.generate(prompts, params, use_tqdm=False)
        times = []
        for _ in range(shape["gen_repeats"]):
            t0 = time.perf_counter()
            done = llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
            made = [len(d.outputs[0].token_ids) for d in done]
            if made != [new] * b:
                raise RuntimeError(f"vLLM generated {made} tokens per prompt, expected {new}")
        out[f"tokens_per_s_b{b}"] = b * new / statistics.median(times)
    Path(result).write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------------- BENCHMARKS.md


def _gib(b: Optional[int]) -> str:
    return f"{b / 2**30:.1f} GiB" if b else "-"


def _pct(x: Optional[float]) -> str:
    return f"{100 * x:.1f} %" if x is not None else "-"


def _met(flag: Optional[bool]) -> str:
    return {True: "met", False: "**not met**"}.get(flag, "")


def markdown(r: dict[str, Any]) -> str:
    """The "GPU: ... (<card>)" section of BENCHMARKS.md, from a results file."""
    ft, di, gen = r.get("finetune") or {}, r.get("distill") or {}, r.get("generation") or {}
    lines = [
        f"{SECTION_PREFIX} fine-tuning, distillation and quantized generation on one card ({r['device']})",
        "",
        f"Command: `{COMMAND}` on the GPU machine (the exact one-line device command, wheels included, is at the top "
        "of `scripts/bench/gpu.py`); results in `benchmarks/results/gpu.json`, this section written by "
        "`scripts/bench/gpu.py --markdown-only`. "
        + provenance_line(r.get("provenance"))
        + f" Machine: {machine_line(machine_of(r))}; {versions_line(versions_of(r))}. The script took "
        f"{r.get('wall_s', 0) / 60:.1f} min"
        + ("" if r.get("complete", True) else " and was cut short: parts missing below did not run")
        + ". Every model has random weights of the real model's shape (the machine "
        "cannot reach the hub): speed only, no quality.",
        "",
    ]
    rows = []
    if "raydist" in ft:
        rd, hw = ft["raydist"], ft["hand_written"]
        shape = ft["model"]["shape"]
        what = (
            f"SmolLM2-360M shape ({ft['model']['parameters'] / 1e6:.0f} M parameters, {shape['num_hidden_layers']} "
            f"layers), full fine-tune, bf16, ZeRO-2, 1 GPU, {ft['micro_batch']} x {ft['seq_len']} packed tokens"
        )
        rows += [
            (
                "fine-tune tokens/s: raydist (Ray Train) / hand-written DeepSpeed",
                f"{rd['tokens_per_s']:,.0f}",
                f"{hw['tokens_per_s']:,.0f}",
                "",
            ),
            (
                "MFU (vs the card's measured bf16 matmul rate)",
                _pct(rd["mfu"]),
                _pct(hw["mfu"]),
                f">= {_pct(GOALS['mfu_min'])}: {_met(ft.get('goal_mfu_met'))}",
            ),
            (
                "peak memory (torch.cuda.max_memory_allocated)",
                _gib(rd["peak_memory_bytes"]),
                _gib(hw["peak_memory_bytes"]),
                "",
            ),
            (
                "median step, s",
                f"{rd['median_step_s']:.4f}",
                f"{hw['median_step_s']:.4f}",
                f"ratio {ft['overhead_ratio']:.3f} (goal <= {GOALS['overhead_ratio_max']}): "
                f"{_met(ft.get('goal_overhead_met'))}",
            ),
        ]
    elif ft.get("error"):
        rows.append(("fine-tune", ft["error"], "", ""))
    if "host_share" in di:
        rows.append(
            (
                f"distillation step ({di['settings']['micro_batch']} x {di['settings']['seq_len']} tokens): "
                "raydist / arithmetic replay, s",
                f"{di['step_s']:.4f}",
                f"{di['arithmetic_step_s']:.4f}",
                f"host share {_pct(di['host_share'])} (goal < {_pct(GOALS['host_share_max'])}): "
                f"{_met(di.get('goal_host_share_met'))}",
            )
        )
    elif di.get("error"):
        rows.append(("distillation", di["error"], "", ""))
    lines += md_table(("measure", "raydist", "reference", "goal"), rows)
    lines.append("")
    if "raydist" in ft:
        m = ft["model"]
        lines.append(
            f"- Fine-tune: {what}, {ft['steps']} steps, median over steps > {ft['warmup_steps_dropped']}; the "
            "reference is `_ds_baseline_loop.py` under torchrun on the same config. FLOPs per token "
            f"{m['flops_per_token'] / 1e9:.3f} G = {m['formula']}; matmul rate measured in the run: "
            f"{ft['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s "
            f"({r['matmul'][0]['n']}^3 {r['matmul'][0]['dtype']})."
        )
    if "host_share" in di:
        lines.append(
            f"- Distillation: `distill_gpu.run` (online bf16 teacher, {di['teacher']['parameters'] / 1e6:.0f} M, "
            f"student {(di.get('student_parameters') or 0) / 1e6:.0f} M, forward KL, {di['settings']['steps']} steps); "
            "the replay runs the same student / teacher / loss / DeepSpeed step on a batch already on the GPU, so "
            "host share = 1 - replay / raydist step."
        )
    grows = []
    for name, row in (gen.get("rows") or {}).items():
        if "error" in row:
            grows.append((name, row["error"], "", "", "", "", ""))
            continue
        b1, b16 = row.get("tokens_per_s_b1"), row.get("tokens_per_s_b16")
        grows.append(
            (
                name,
                f"{row['artifact_bytes'] / 2**20:,.0f} MiB",
                ", ".join(row["kernels"]),
                f"{b1:,.0f}" if b1 else "-",
                f"{b16:,.0f}" if b16 else "-",
                f"{row['vs_dense_b1']:.2f}" if "vs_dense_b1" in row else "",
                f"{row['vs_dense_b16']:.2f}" if "vs_dense_b16" in row else "",
            )
        )
    if grows:
        st = gen["settings"]
        lines += [
            "",
            f"Quantized generation (SmolLM2-360M shape, bf16, artifacts written and reloaded by raydist, served by "
            f"`BatchGenerator`; {st['gen_prompt']} prompt tokens, {st['gen_new_tokens']} new tokens, median of "
            f"{st['gen_repeats']}):",
            "",
            *md_table(
                ("artifact", "size", "kernel", "tokens/s b1", "tokens/s b16", "vs dense b1", "vs dense b16"),
                grows,
                align="lllrrrr",
            ),
            "",
        ]
        v = gen.get("vllm") or {}
        if "tokens_per_s_b1" in v:
            lines.append(
                f"- vLLM {v['vllm']} on the int4 compressed-tensors artifact: "
                + ", ".join(f"b{b} {v[f'tokens_per_s_b{b}']:,.0f} tokens/s" for b in st["gen_batches"])
                + "."
            )
        else:
            lines.append(f"- vLLM: {v.get('skipped') or v.get('error') or 'not run'}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (automatic without CUDA)")
    ap.add_argument("--out", type=Path, help="write gpu.json here (and nothing in benchmarks/ or BENCHMARKS.md)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--update-benchmarks-md", action="store_true", help="also write the GPU section of BENCHMARKS.md")
    ap.add_argument("--markdown-only", action="store_true", help=f"rewrite the section from {RESULTS.name} only")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (printed)")
    ap.add_argument("--vllm-child", help=argparse.SUPPRESS)
    ap.add_argument("--vllm-result", help=argparse.SUPPRESS)
    ap.add_argument("--vllm-shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_child:
        vllm_child(args.vllm_child, args.vllm_result, json.loads(args.vllm_shape))
        return 0
    if args.markdown_only:
        replace_section(markdown(json.loads(RESULTS.read_text())), heading_prefix=SECTION_PREFIX)
        say(f"rewrote the '{SECTION_PREFIX[3:]}' section of {BENCHMARKS_MD.name} from {RESULTS.relative_to(REPO)}")
        return 0
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        ap.error(f"--parts takes {', '.join(PARTS)}")

    measured = provenance()  # before the run: the code that is measured is the code at the start
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    if args.update_benchmarks_md and (args.out or not gpu):
        ap.error("--update-benchmarks-md writes what a GPU run records in benchmarks/results (no --out, no --cpu)")
    # Before DeepSpeed is imported anywhere (finetune_overhead only sets a default).
    os.environ["DS_ACCELERATOR"] = "cuda" if gpu else "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    mode = "gpu" if gpu else "cpu"
    s = SETTINGS[mode]
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    work = Path(tempfile.mkdtemp(prefix="raydist-bench-gpu-"))
    say(f"{mode} mode on {torch.cuda.get_device_name(0) if gpu else 'CPU'}; work dir {work}")

    import distill_gpu

    model_dir_cache: dict[str, Path] = {}

    def model_dir() -> Path:
        """The random-weight model of ``s['model']``'s shape, built once (fine-tune base, generation)."""
        if "m" not in model_dir_cache:
            model_dir_cache["m"] = distill_gpu.build_teacher(make_shape_dir(work / "shape", s["model"]), work / "model")
        return model_dir_cache["m"]

    ctx = SimpleNamespace(s=s, gpu=gpu, device=device, dtype=dtype, work=work, model_dir=model_dir, rates=[])
    t_start = time.time()
    result: dict[str, Any] = {
        "provenance": measured,
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "mode": mode,
        "weights": "random, real models' shapes (speed only)",
        "goals": GOALS,
        "settings": s,
    }
    ctx.rates.append(matmul_rate(device, dtype, s["matmul_n"], s["matmul_min_run_time_s"]))
    result["matmul"] = ctx.rates
    failed: list[str] = []
    target = (args.out / "gpu.json") if args.out else (RESULTS if gpu else None)

    def write(final: bool) -> None:
        """The results so far (after every part, so a run cut short by its time limit keeps what it measured)."""
        result["wall_s"] = time.time() - t_start
        result["complete"] = final
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(result, indent=2) + "\n")

    try:
        for name, fn in (("finetune", part_finetune), ("distill", part_distill), ("generation", part_generation)):
            if name not in parts:
                continue
            t0 = time.time()
            say(f"=== {name}")
            try:
                result[name] = fn(ctx)
            except Exception as e:  # noqa: BLE001 - report and go on with the other parts
                traceback.print_exc()
                result[name] = {"error": f"{type(e).__name__}: {e}"}
                failed.append(name)
            result[name]["wall_s"] = time.time() - t0
            say(f"{name} took {time.time() - t0:.0f} s")
            write(final=False)
    finally:
        import finetune_overhead as fo

        fo.shutdown_ray()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    write(final=True)
    summary = {
        "device": result["device"],
        "mfu": (result.get("finetune") or {}).get("raydist", {}).get("mfu"),
        "overhead_ratio": (result.get("finetune") or {}).get("overhead_ratio"),
        "host_share": (result.get("distill") or {}).get("host_share"),
        "generation_tokens_per_s": {
            k: {b: v.get(f"tokens_per_s_b{b}") for b in s["gen_batches"]}
            for k, v in ((result.get("generation") or {}).get("rows") or {}).items()
        },
        "vllm": (result.get("generation") or {}).get("vllm"),
        "failed_parts": failed,
        "wall_s": round(result["wall_s"], 1),
    }
    print(json.dumps(summary, indent=1), flush=True)
    if target is None:
        say("CPU mode without --out: nothing written")
    else:
        say(f"wrote {target}")
    if args.update_benchmarks_md and target == RESULTS:
        replace_section(markdown(result), heading_prefix=SECTION_PREFIX)
        say(f"wrote the '{SECTION_PREFIX[3:]}' section of {BENCHMARKS_MD.name}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
