"""Export a trained model to the artifact layout and prove it reloads to the same logits.

Works from a full (consolidated) state dict, so the same code serves DDP-like ZeRO 0–2 (rank 0 already
holds every weight) and ZeRO-3 (weights gathered to rank 0 first). Building the LoRA adapter from the
gathered state dict — not from the live, partitioned module — is what keeps a ZeRO-3 adapter from being
saved empty, a known trap when ``save_pretrained`` is called on a sharded peft model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from raydist.config.base import LoraSettings
from raydist.core.models import count_parameters, make_shareable, save_model_dir


class ExportError(RuntimeError):
    """The exported artifact does not reproduce the trained model."""


def peft_lora_config(lora: LoraSettings):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )


def probe_batch(vocab_size: int, seq_len: int = 16, seed: int = 1234) -> torch.Tensor:
    """A fixed token batch [2, seq_len] used to compare logits before and after export."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, seq_len), generator=g)


@torch.no_grad()
def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits [B, T, V] on CPU."""
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.float().cpu()


def export_artifact(
    state_dict: dict[str, torch.Tensor],
    *,
    base_config,
    tokenizer,
    lora: Optional[LoraSettings],
    out_dir: str | Path,
    reference_logits: torch.Tensor,
    probe: torch.Tensor,
    adapter_base_path: str = "",
    atol: float = 1e-3,
) -> dict[str, Any]:
    """Write the trained weights as an HF directory (plus ``adapter/`` for LoRA) and verify it.

    The directory is built in a temporary sibling and renamed into place only after verification, so a
    failed export never leaves a half-written artifact.

    Args:
        state_dict: full state dict of the trained module (peft keys for LoRA).
        base_config: transformers config of the base model.
        lora: the LoRA settings when the state dict is a peft model's, else None.
        reference_logits: logits [B, T, V] of the trained model on ``probe`` [B, T].

    Returns:
        ``{"num_parameters", "export_max_abs_logit_diff", "adapter_nonzero"}``.

    Raises:
        ExportError: the reloaded model's logits differ from ``reference_logits`` by more than ``atol``.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    dtype = next(iter(state_dict.values())).dtype
    model = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
    info: dict[str, Any] = {}
    try:
        if lora is not None:
            from peft import get_peft_model

            peft_model = get_peft_model(model, peft_lora_config(lora))
            peft_model.load_state_dict(state_dict, strict=True)
            peft_model.peft_config["default"].base_model_name_or_path = adapter_base_path
            peft_model.save_pretrained(tmp / "adapter", safe_serialization=True)
            info["adapter_nonzero"] = _adapter_is_trained(tmp / "adapter")
            model = peft_model.merge_and_unload()
        else:
            missing, unexpected = model.load_state_dict(state_dict, strict=False)
            tied = set(getattr(model, "_tied_weights_keys", None) or [])
            bad_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
            if bad_missing or unexpected:
                raise ExportError(
                    f"state dict does not match the model: missing {bad_missing}, unexpected {unexpected}"
                )
        save_model_dir(model, tokenizer, tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
        diff = float((logits_of(reloaded, probe) - reference_logits).abs().max())
        info["export_max_abs_logit_diff"] = diff
        if not diff <= atol:
            raise ExportError(f"exported model's logits differ from the trained model's by {diff:.3g} (> {atol})")
        info["num_parameters"] = count_parameters(reloaded)
        if out.exists():
            shutil.rmtree(out)
        make_shareable(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def _adapter_is_trained(adapter_dir: Path) -> bool:
    """True when the saved adapter holds LoRA tensors and at least one ``lora_B`` moved off its zero init."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    b = [t for k, t in tensors.items() if "lora_B" in k]
    if not b:
        raise ExportError(f"adapter in {adapter_dir} holds no LoRA weights")
    return any(bool(t.abs().sum() > 0) for t in b)
