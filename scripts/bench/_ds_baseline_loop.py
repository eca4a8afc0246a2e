"""Hand-written DeepSpeed training loop: the baseline raydist's Ray Train loop is compared against.

Launched by ``finetune_overhead.py`` as::

    torchrun --nproc_per_node 2 scripts/bench/_ds_baseline_loop.py --config cfg.json --out times.json

It reads the very FinetuneConfig the raydist run used (JSON), so model, data, batch shape, optimizer,
schedule and DeepSpeed config cannot drift apart. ``DS_ACCELERATOR=cuda`` (``gpu.py``) runs it on the GPU
with raydist's GPU choices (NCCL, bf16 under DeepSpeed); otherwise CPU, gloo, fp32. It deliberately does what a
person would write without raydist: ``transformers`` loads the model, the tokenized blocks live in a Python list,
each rank slices its rows out of the global batch, and there is no Ray, no Ray Data, no progress printer, no
checkpoint.

Timing mirrors what raydist logs in ``metrics.jsonl``: one ``time.time()`` per optimizer step, taken after
the loss all-reduce (the point where raydist's rank 0 writes its record). Setup (model load, tokenization,
``deepspeed.initialize``) happens before the clock starts. On CUDA rank 0 also records
``torch.cuda.max_memory_allocated``.

Not a test, never imported by raydist.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="FinetuneConfig as JSON (what the raydist run used)")
    ap.add_argument("--out", required=True, help="where rank 0 writes the per-step times (JSON)")
    args = ap.parse_args()

    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydist.config.finetune import FinetuneConfig
    from raydist.core.data import build_datasets, collate
    from raydist.train.plumbing import adamw, deepspeed_config, lr_lambda, param_groups, seed_everything

    cfg = FinetuneConfig.model_validate_json(Path(args.config).read_text())
    assert not cfg.lora.enabled, "the overhead baseline is a full fine-tune"
    cuda = os.environ["DS_ACCELERATOR"] == "cuda"  # raydist's worker: bf16 and NCCL exactly when on CUDA
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mb, gas, steps = cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.train.max_steps

    seed_everything(cfg.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)

    # Same blocks as raydist's driver writes to Parquet; the order is a seeded shuffle (raydist uses Ray
    # Data's local shuffle buffer). Every block is exactly seq_len tokens, so the compute per step is equal.
    train, _ = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    random.Random(cfg.train.seed).shuffle(train)
    global_rows = mb * world
    need = steps * gas * global_rows
    if len(train) < need:
        raise SystemExit(f"only {len(train)} training blocks, {need} needed")

    optimizer = adamw(param_groups(model, cfg.optim.weight_decay), cfg.optim)  # the optimizer raydist builds
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(
            cfg.deepspeed, micro_batch_size=mb, grad_accum_steps=gas, grad_clip=cfg.optim.grad_clip, bf16=cuda
        ),
    )
    engine.train()
    dist.barrier()  # both ranks start the clock together

    times = [time.time()]  # times[0]: loop start; times[k]: end of optimizer step k
    losses, step_tokens = [], []
    micro, step_loss, tokens = 0, 0.0, 0
    while len(times) <= steps:
        rows = train[micro * global_rows : (micro + 1) * global_rows]  # the global micro-batch
        tokens += sum(len(r["input_ids"]) for r in rows)
        b = collate(rows[rank * mb : (rank + 1) * mb], tokenizer.pad_token_id)
        out = engine(**{k: v.to(device) for k, v in b.items()})
        engine.backward(out.loss)
        engine.step()
        step_loss += out.loss.item() / gas
        micro += 1
        if micro % gas:
            continue
        loss_t = torch.tensor([step_loss], dtype=torch.float64, device=device)
        dist.all_reduce(loss_t)  # raydist does the same per step, for its logged loss
        times.append(time.time())
        losses.append(float(loss_t) / world)
        step_tokens.append(tokens)
        step_loss, tokens = 0.0, 0

    if rank == 0:
        Path(args.out).write_text(
            json.dumps(
                {
                    "times": times,
                    "losses": losses,
                    "step_tokens": step_tokens,
                    "torch_threads": torch.get_num_threads(),
                    "world_size": world,
                    "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
