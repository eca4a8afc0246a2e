"""One model loader for every stage: local HF directory, GGUF file, hub id, or a tiny random Llama.

A GGUF checkpoint is dequantized by transformers' GGUF loader and then rebuilt as a clean, plain model
(``from_config`` + ``load_state_dict``): transformers refuses to ``save_pretrained`` a GGUF-loaded
model, and every later stage must be able to save what it loaded.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from raydist.config.base import ModelConfig, TinyModelSpec
from raydist.core.data import pydoc_topics_text
from raydist.core.storage import is_uri, local_copy, on_this_node

TINY_RANDOM = "tiny-random"
TINY_VOCAB_SIZE = 512
# The tiny tokenizer is trained once on the stdlib corpus and cached here; bumping the version
# invalidates old caches when the recipe changes.
_TINY_TOKENIZER_VERSION = "v1"

SourceKind = Literal["tiny", "hf_dir", "gguf", "hub"]


class ModelSourceError(ValueError):
    """The model path names nothing loadable; the message says what was looked for."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location. ``gguf_file`` is set only for GGUF sources (file name inside ``path``)."""

    kind: SourceKind
    path: str
    gguf_file: Optional[str] = None
    origin: Optional[str] = None  # the URI a remote model was downloaded from (``path`` is the local copy)

    def describe(self) -> str:
        if self.origin:
            return self.origin
        if self.kind == "gguf":
            return str(Path(self.path) / self.gguf_file)
        return self.path


def resolve_model_source(cfg: ModelConfig) -> ModelSource:
    """Classify ``cfg.path`` without loading weights.

    Raises:
        ModelSourceError: the path does not exist and is not a hub id, or a directory holds no model.
    """
    path = cfg.path
    if path == TINY_RANDOM:
        return ModelSource("tiny", TINY_RANDOM)
    if is_uri(path):  # an artifact on shared storage: read through a cached local copy
        try:
            local = local_copy(path)
        except (FileNotFoundError, OSError, ValueError) as e:
            raise ModelSourceError(f"model {path!r} cannot be read: {e}") from None
        from dataclasses import replace

        return replace(resolve_model_source(cfg.model_copy(update={"path": str(local)})), origin=path)
    p = Path(on_this_node(path)).expanduser()  # a model shipped with a submitted job, on another node
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelSourceError(f"model file {p} is not a .gguf file; give a directory or a .gguf file")
        return ModelSource("gguf", str(p.parent.resolve()), p.name)
    if p.is_dir():
        if cfg.gguf_file:
            if not (p / cfg.gguf_file).is_file():
                raise ModelSourceError(f"gguf_file {cfg.gguf_file!r} not found in {p}")
            return ModelSource("gguf", str(p.resolve()), cfg.gguf_file)
        if (p / "config.json").is_file():
            return ModelSource("hf_dir", str(p.resolve()))
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(p.resolve()), ggufs[0])
        if len(ggufs) > 1:
            raise ModelSourceError(f"{p} holds several .gguf files {ggufs}; pick one with model.gguf_file")
        raise ModelSourceError(f"{p} is a directory without config.json or a .gguf file")
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return ModelSource("hub", path)
    raise ModelSourceError(
        f"model {path!r} not found: expected a local HF directory, a .gguf file, a hub id (org/name) or {TINY_RANDOM!r}"
    )


def tiny_llama_config(spec: TinyModelSpec, vocab_size: int = TINY_VOCAB_SIZE):
    """A small LlamaConfig for tests; GQA when ``num_kv_heads < num_heads``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _hub_kwargs(src: ModelSource) -> dict:
    return {"gguf_file": src.gguf_file} if src.kind == "gguf" else {}


def load_model_config(cfg: ModelConfig):
    """The transformers config of the model (cheap: no weights are read)."""
    from transformers import AutoConfig

    src = resolve_model_source(cfg)
    if src.kind == "tiny":
        return tiny_llama_config(cfg.tiny)
    try:
        config = AutoConfig.from_pretrained(src.path, **_hub_kwargs(src))
    except OSError as e:
        raise ModelSourceError(f"cannot load model config from {src.describe()}: {e}") from None
    # A GGUF config may carry the GGUF quantization marker; the rebuilt model is plain.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer, with a pad token guaranteed (eos when the model has none)."""
    from transformers import AutoTokenizer

    src = resolve_model_source(cfg)
    if src.kind == "tiny":
        tok = tiny_tokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(src.path, **_hub_kwargs(src))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Load the model as a plain ``transformers`` causal LM in ``dtype`` (weights on CPU).

    ``tiny-random`` is initialised from ``seed`` so every worker builds identical weights.
    """
    from transformers import AutoModelForCausalLM

    src = resolve_model_source(cfg)
    if src.kind == "tiny":
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_llama_config(cfg.tiny), dtype=dtype)
    elif src.kind == "gguf":
        model = _load_gguf_as_plain(src, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _load_gguf_as_plain(src: ModelSource, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    return model.to(dtype)


def save_model_dir(model, tokenizer, out_dir: str | Path) -> Path:
    """Write a Hugging Face directory (safetensors + config + generation config + tokenizer)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF checkpoint once into a safetensors HF directory that loads fast and saves cleanly.

    The result is written to a temporary sibling directory and renamed into place, so an interrupted
    conversion never leaves a half-written model behind.
    """
    gguf_path = Path(gguf_path)
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another directory")
    cfg = ModelConfig(path=str(gguf_path))
    model = load_model(cfg)
    tok = load_tokenizer(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    save_model_dir(model, tok, tmp)
    make_shareable(tmp)
    os.replace(tmp, out)
    return out


def make_shareable(directory: Path) -> None:
    """mkdtemp (and some writers) create private files; an artifact is meant to be read by others."""
    os.chmod(directory, 0o755)
    for p in Path(directory).rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def tiny_tokenizer():
    """A 512-token byte-level BPE trained on the stdlib's pydoc corpus, with a ChatML template.

    Tests need a real tokenizer without hub access; training one takes about a second and the result is
    cached under ``~/.cache/raydist``.
    """
    from transformers import PreTrainedTokenizerFast

    cache = Path(os.environ.get("RAYDIST_CACHE", Path.home() / ".cache" / "raydist"))
    target = cache / f"tiny-tokenizer-{_TINY_TOKENIZER_VERSION}"
    if not (target / "tokenizer.json").is_file():
        _build_tiny_tokenizer(target)
    return PreTrainedTokenizerFast.from_pretrained(str(target))


_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _build_tiny_tokenizer(target: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]  # ids 0..3: pad, bos, eos, chat start
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([pydoc_topics_text()], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
    )
    fast.chat_template = _CHATML_TEMPLATE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-tok.", dir=target.parent))
    fast.save_pretrained(str(tmp))
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; its copy is identical
        pass


def hash_model_source(src: ModelSource, cfg: ModelConfig) -> str:
    """A content hash of the model's files (weights included), for lineage in manifests."""
    h = hashlib.sha256()
    if src.kind == "tiny":
        h.update(cfg.tiny.model_dump_json().encode())
        return h.hexdigest()
    if src.kind == "hub":
        h.update(src.path.encode())
        return h.hexdigest()
    if src.kind == "gguf":
        files = [Path(src.path) / src.gguf_file]
    else:
        files = sorted(p for p in Path(src.path).iterdir() if p.is_file() and p.name != "raydist.json")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def count_parameters(model) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def missing_lora_targets(module_names: list[str], targets: list[str]) -> list[str]:
    """Target names that match no module (peft matches a target as a name suffix on a ``.`` boundary)."""
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
