"""`raydist generate` on a local Ray: Ray Data actors answer prompts; the output feeds fine-tuning."""

import json
from pathlib import Path

import pytest

from raydist.cli import main
from raydist.config import DataConfig, DataSourceConfig
from raydist.core.data import build_datasets
from raydist.core.models import tiny_tokenizer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "tests" / "data" / "prompts.jsonl"


def test_generate_writes_answers_in_input_order_and_finetune_reads_them(tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    args = [
        "generate",
        "-c",
        str(REPO / "jobs" / "generate_tiny.yaml"),
        f"prompts.path={PROMPTS}",
        f"output={out}",
        "num_actors=2",
        "batch_size=3",
        "max_new_tokens=8",
    ]
    assert main(args) == 0
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["instruction"], r["input"]) for r in rows] == [(p["instruction"], p["input"]) for p in prompts]
    assert all(isinstance(r["output"], str) for r in rows)
    # Sequence-level KD: the written file is instruction data the fine-tuning stage accepts.
    train, _ = build_datasets(
        DataConfig(train=DataSourceConfig(path=str(out)), eval_fraction=0.0, seq_len=256), tiny_tokenizer(), seed=0
    )
    assert len(train) == len(prompts)
    # An existing output is refused and left untouched.
    before = out.read_bytes()
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before


def test_generate_chat_prompts_continue_the_conversation(tmp_path):
    prompts = tmp_path / "chat.jsonl"
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    prompts.write_text("\n".join(json.dumps({"messages": c}) for c in convs) + "\n")
    out = tmp_path / "chat_answers.jsonl"
    assert (
        main(
            [
                "generate",
                "-c",
                str(REPO / "jobs" / "generate_tiny.yaml"),
                f"prompts.path={prompts}",
                f"output={out}",
                "max_new_tokens=4",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][:-1] for r in rows] == convs
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
