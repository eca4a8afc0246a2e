"""`raydist generate`: a model answers a prompt dataset with Ray Data batch inference.

The output is a jsonl instruction (or chat) dataset that `raydist finetune` and `raydist distill` read,
which is sequence-level knowledge distillation: the student trains on the teacher's answers.

Driver: read + render prompts once, hand them to Ray Data, ``map_batches`` over a pool of actors that
each hold one copy of the model (GPU when present), collect in input order, write the file atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from raydist.config.generate import GenerateConfig
from raydist.core import storage
from raydist.core.data import DataError, detect_format, load_records, render_prompt
from raydist.core.models import load_model, load_tokenizer
from raydist.core.preflight import preflight_generate
from raydist.core.resources import plan_units, unit_device
from raydist.core.runs import init_ray, with_absolute_paths
from raydist.distill.generation import generate_answers, prompt_records


class AnswerWriter:
    """A Ray Data actor: loads the model once, then answers batches of rendered prompts."""

    def __init__(self, cfg_json: dict[str, Any]):
        import torch

        self.cfg = GenerateConfig.model_validate(cfg_json)
        self.tokenizer = load_tokenizer(self.cfg.model)
        device = unit_device(self.cfg.resources.device, "generate actor")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = load_model(self.cfg.model, dtype=dtype).eval().to(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [list(p) for p in batch["prompt_ids"]]
        answers = generate_answers(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            seed=self.cfg.seed + int(batch["index"][0]),
        )
        return {"index": batch["index"], "answer": np.array(answers, dtype=object)}


def run_generate(cfg: GenerateConfig, *, verbose: bool = True) -> Path:
    """Answer every prompt and write ``cfg.output``; returns its path.

    Raises:
        PreflightError: unreadable prompts, unknown model, or ``cfg.output`` exists (never overwritten).
        DataError: a prompt longer than ``max_prompt_tokens``.
    """
    import ray

    say = print if verbose else (lambda *a, **k: None)
    preflight_generate(cfg)
    remote = storage.is_uri(cfg.output)
    # A URI output is written locally first and uploaded whole (a PUT is atomic, like the rename below).
    out = (
        Path(tempfile.mkdtemp(prefix="raydist-generate-")) / "answers.jsonl"
        if remote
        else Path(cfg.output).expanduser().resolve()
    )
    records = load_records(cfg.prompts)
    fmt = detect_format(records, cfg.prompts, require_output=False)
    prompts = prompt_records(records, fmt)
    tokenizer = load_tokenizer(cfg.model)
    rendered = [render_prompt(tokenizer, p["messages"]) for p in prompts]
    too_long = [i for i, r in enumerate(rendered) if len(r) > cfg.max_prompt_tokens]
    if too_long:
        raise DataError(f"prompts {too_long[:10]} exceed max_prompt_tokens={cfg.max_prompt_tokens}")
    cfg = with_absolute_paths(cfg)

    init_ray(cfg.num_actors * cfg.resources.num_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = plan_units(cfg.resources, cfg.num_actors, "generate actor")
    # Sorting by length keeps padding low inside a batch; the index restores the input order at the end.
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))
    ds = ray.data.from_items([{"index": i, "prompt_ids": rendered[i]} for i in order])
    answers_ds = ds.map_batches(
        AnswerWriter,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump(mode="json")},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=plan.num_gpus,
        num_cpus=plan.num_cpus,
    )
    t0 = time.time()
    answers: dict[int, str] = {}
    for row in answers_ds.iter_rows():
        answers[int(row["index"])] = str(row["answer"])
        if verbose and len(answers) % max(1, len(prompts) // 10) == 0:
            say(f"[raydist] generated {len(answers)}/{len(prompts)} answers ({time.time() - t0:.0f}s)")

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w") as fh:
        for i, p in enumerate(prompts):
            if fmt == "instruction":
                rec = {"instruction": p["instruction"], "input": p["input"], "output": answers[i]}
            else:
                rec = {"messages": p["messages"] + [{"role": "assistant", "content": answers[i]}]}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)  # a half-written dataset is never visible under the final name
    if remote:
        storage.upload(out, cfg.output)
        shutil.rmtree(out.parent)
        out = cfg.output
    say(f"[raydist] wrote {len(prompts)} answers to {out}")
    return out
