"""Plain text: the built-in generated corpus and fast encoding of many documents."""

from __future__ import annotations

import json
import random
from typing import List, Optional, Sequence

import numpy as np

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our team", "the child"]
VERBS = ["sees", "likes", "finds", "carries", "paints", "follows", "builds", "hears"]
OBJECTS = ["a red ball", "the green door", "a long letter", "the blue boat", "an old map", "the tall tree"]
PLACES = ["in the garden", "near the river", "at the station", "under the bridge", "on the hill", "at home"]


def builtin_documents(n_docs: int, seed: int = 0) -> List[str]:
    """A deterministic, learnable corpus: templated sentences and small sums (loss falls within ~30 steps)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(2, 5)):
            if rng.random() < 0.25:
                a, b = rng.randint(0, 20), rng.randint(0, 20)
                parts.append(f"{a} plus {b} is {a + b}.")
            else:
                s, v, o, p = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES)
                parts.append(f"{s} {v} {o} {p}.")
        docs.append(" ".join(parts))
    return docs


def encode(tokenizer, texts: List[str], byte_identity: Optional[bool] = None) -> Sequence[Sequence[int]]:
    """Each text's token ids, no special tokens added: `tokenizer(texts, add_special_tokens=False)`.

    A byte-identity tokenizer (the built-in byte tokenizer: id = UTF-8 byte) is applied as `text.encode()`,
    ~50x faster than through `tokenizers` (the 2.6M-character built-in corpus: 0.03 s instead of 1.4-1.6 s, the
    bulk of a fresh run's data preparation). Texts containing a special token's text still go through the
    tokenizer, and a sample is checked against it, so the ids are the same either way. `byte_identity`:
    is_byte_identity(tokenizer) when the caller already knows it (it serialises the tokenizer).
    """
    if byte_identity is None:
        byte_identity = is_byte_identity(tokenizer)
    if not texts or not byte_identity:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    specials = [t for t in tokenizer.get_added_vocab() if t]
    ids: List[Sequence[int]] = []
    for text in texts:
        if any(s in text for s in specials):
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))
    sample = texts[:16]
    if tokenizer(sample, add_special_tokens=False)["input_ids"] != [list(map(int, i)) for i in ids[:16]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return ids


def is_byte_identity(tokenizer) -> bool:
    """A byte-level BPE with no merges whose vocabulary maps GPT-2's byte alphabet to the byte values, with
    nothing normalised or prefixed (launcher.models.tokenizer.byte_tokenizer): its ids are the UTF-8 bytes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    from launcher.models.tokenizer import _bytes_to_unicode

    try:
        spec = json.loads(backend.to_str())
    except Exception:  # a backend that cannot be serialised: take the general path
        return False
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (spec.get("normalizer") is not None or model.get("type") != "BPE" or model.get("merges")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space", True) or pre.get("use_regex", True)):
        return False
    vocab = model.get("vocab") or {}
    return all(vocab.get(ch) == b for b, ch in _bytes_to_unicode().items())

