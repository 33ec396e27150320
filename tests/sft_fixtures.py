"""Test fixtures for fine-tuning: chat data (English and Chinese) generated from a seed, a byte-level BPE
tokenizer with a ChatML template trained on it (no download), and tiny random causal LMs saved to disk."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def exchange(rng: random.Random) -> List[Dict[str, str]]:
    a, b = rng.randint(0, 30), rng.randint(0, 30)
    if rng.random() < 0.5:
        return [{"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    return [{"role": "user", "content": f"{a}加{b}等于几？"},
            {"role": "assistant", "content": f"{a}加{b}等于{a + b}。"}]


def conversations(n: int, seed: int = 0) -> List[List[Dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = [{"role": "system", "content": "你是一个乐于助人的助手。"}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            turns += exchange(rng)
        out.append(turns)
    return out


def write_messages(path: Path, n: int, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations(n, seed)),
                    encoding="utf-8")
    return path


def chat_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for conv in conversations(400, seed=99):
        corpus += [t["content"] for t in conv] + ["user", "assistant", "system"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=SPECIALS[1:2], model_max_length=1 << 20)
    tok.chat_template = CHATML
    return tok


def tiny_model_dir(path: Path, kind: str = "qwen2", vocab_size: int = 384) -> Path:
    """A tiny random causal LM of the given family, saved with the chat tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = chat_tokenizer(vocab_size)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    config = config_for(kind, common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def config_for(kind: str, common: dict):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=32)
    if kind == "gemma2":
        return Gemma2Config(**common, head_dim=32, sliding_window=32, final_logit_softcapping=30.0,
                            attn_logit_softcapping=50.0, tie_word_embeddings=True)
    raise ValueError(kind)
