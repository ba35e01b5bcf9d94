"""4-bit QLoRA policies on the CPU: real bitsandbytes Linear4bit layers and peft adapters."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import transformers

from sparsepo_lite import LossConfig, compute_loss
from sparsepo_lite.data import PreferenceCollator, tokenize_dataset
from sparsepo_lite.models import ModelConfig, load_policy
from sparsepo_lite.smollm2 import smollm2_path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer, saved as a model folder."""
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        attention_dropout=0.1,
    )
    d = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def batch(tiny_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    rows = [
        {"prompt": "The film was", "chosen": " a delight from start to end.", "rejected": " dull."},
        {"prompt": "Service:", "chosen": " friendly and fast.", "rejected": " slow and rude, avoid."},
    ]
    examples, _ = tokenize_dataset(rows, tok, max_length=32, max_prompt_length=16)
    return PreferenceCollator(tok.pad_token_id)(examples)


def test_load_4bit_policy(tiny_dir):
    model, tok = load_policy(ModelConfig(tiny_dir, lora_r=4))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every projection of both layers; the head stays unquantized
    assert all(m.support_avx512bf16_for_cpu is False for m in quantized)
    assert quantized[0].weight.quant_type == "nf4" and quantized[0].weight.quant_state.nested  # double quant
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not model.get_output_embeddings().weight.requires_grad
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    attn = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert attn and all(m.attention_dropout == 0 for m in attn)  # the config asked for 0.1
    assert tok.pad_token_id is not None


def test_bf16_4bit_policy_keeps_embeddings_and_head_in_bf16(tiny_dir, batch):
    """peft's prepare_model_for_kbit_training would upcast them to fp32 (2 GB more at Llama-3-8B)."""
    model, _ = load_policy(ModelConfig(tiny_dir, dtype="bfloat16", lora_r=4, device="cpu"))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # peft keeps adapters in fp32
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = compute_loss(model, batch, LossConfig(loss_type="tdpo2"))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)


def _unquantized_twin(model4, tiny_dir):
    """The same policy with every 4-bit weight replaced by its dequantised fp32 value."""
    twin, _ = load_policy(ModelConfig(tiny_dir, quantization="none", lora_r=4))
    mods4 = dict(model4.named_modules())
    with torch.no_grad():
        for name, mod in twin.named_modules():
            src = mods4.get(name)
            if isinstance(src, bnb.nn.Linear4bit):
                mod.weight.copy_(bnb.functional.dequantize_4bit(src.weight.data, src.weight.quant_state))
        params4 = dict(model4.named_parameters())
        for name, p in twin.named_parameters():
            if "lora_" in name:
                p.copy_(params4[name])
    return twin


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["dpo", "tdpo2"])
def test_lora_gradients_through_4bit_equal_an_unquantized_twin(tiny_dir, batch, loss_type):
    model4, _ = load_policy(ModelConfig(tiny_dir, lora_r=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model4.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    twin = _unquantized_twin(model4, tiny_dir)
    # An eval-mode no-grad forward first: on AVX512-BF16 CPUs this is what repacks the weights
    # and silently breaks LoRA gradients.
    for m in (model4, twin):
        m.eval()
        with torch.no_grad():
            m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        m.train()
    cfg = LossConfig(loss_type=loss_type)
    l4, _ = compute_loss(model4, batch, cfg)
    lt, _ = compute_loss(twin, batch, cfg)
    torch.testing.assert_close(l4, lt, rtol=1e-5, atol=1e-6)
    l4.backward()
    lt.backward()
    p4 = dict(model4.named_parameters())
    n = 0
    for name, p in twin.named_parameters():
        if "lora_" in name:
            g4 = p4[name].grad
            assert g4 is not None, f"no gradient for {name} through the 4-bit model"
            torch.testing.assert_close(g4, p.grad, rtol=1e-4, atol=1e-6)
            n += 1
    assert n == 2 * 7 * 2


def test_bad_model_configs():
    with pytest.raises(ValueError, match="quantization must be"):
        ModelConfig("x", quantization="8bit")
    with pytest.raises(ValueError, match="lora_r must be"):
        ModelConfig("x", lora_r=0)


@pytest.mark.parametrize("quantization", ["4bit", "none"])
def test_random_policy_in_memory_equals_save_and_load(tmp_path, quantization):
    """random_policy (the GPU check's 8B model, never written to disk) builds the same weights and
    layout as saving the seeded model and loading it with load_policy."""
    from sparsepo_lite.models import random_policy

    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    cfg = ModelConfig(str(tmp_path), quantization=quantization, lora_r=4, device="cpu")
    built = random_policy(config, cfg, seed=3)
    torch.manual_seed(3)
    transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config), dtype=torch.float32
    ).save_pretrained(tmp_path)
    loaded, _ = load_policy(cfg, tokenizer=False)
    a, b = built.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:  # packed NF4 bytes, absmax and double-quant statistics included
        assert torch.equal(a[name], b[name]), name
    if quantization == "4bit":
        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in built.modules()) == 2 * 7
        assert built.get_base_model().is_loaded_in_4bit
    assert {n for n, p in built.named_parameters() if p.requires_grad} == {
        n for n, p in loaded.named_parameters() if p.requires_grad
    }
    ids = torch.randint(0, 300, (2, 12))
    built.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(built(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=0, atol=0)
