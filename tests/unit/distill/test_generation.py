import pytest
import torch

from raydist.config import ModelConfig
from raydist.core.data import DataError, render_prompt
from raydist.core.models import load_model
from raydist.distill.generation import generate_answers, prompt_records


def test_instruction_and_chat_prompts():
    recs = prompt_records([{"instruction": "Add", "input": "1 and 2"}, {"instruction": "Hi"}], "instruction")
    assert recs[0]["messages"] == [{"role": "user", "content": "Add\n\n1 and 2"}]
    assert recs[1]["messages"] == [{"role": "user", "content": "Hi"}] and recs[1]["input"] == ""
    chat = prompt_records(
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "old"}]}], "chat"
    )
    assert chat[0]["messages"] == [{"role": "user", "content": "q"}]
    with pytest.raises(DataError, match="does not end with a user turn"):
        prompt_records([{"messages": [{"role": "system", "content": "s"}]}], "chat")


def test_left_padded_batch_matches_one_by_one(tiny_tokenizer):
    model = load_model(ModelConfig(path="tiny-random"), seed=0).eval()
    # With tied random embeddings greedy decoding just repeats the last prompt token ("\n", stripped to
    # ""); an untied random head makes the answers non-trivial, so the comparison below means something.
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    )
    prompts = [render_prompt(tiny_tokenizer, [{"role": "user", "content": t}]) for t in ("a", "a much longer prompt")]
    assert prompts[0][-3:] == render_prompt(tiny_tokenizer, [{"role": "user", "content": "b"}])[-3:]  # gen prompt
    batch = generate_answers(model, tiny_tokenizer, prompts, max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)
    single = [
        generate_answers(model, tiny_tokenizer, [p], max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)[0]
        for p in prompts
    ]
    assert batch == single and all(batch)
