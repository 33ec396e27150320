"""Tokenizers: a model dir's own (model.path), or a byte-level one built on the fly (no download).

The byte-level tokenizer maps byte b to id b (GPT-2's byte-to-unicode alphabet, no merges) plus three
special tokens, so any text round-trips exactly and `AutoTokenizer.from_pretrained` reloads it offline.
"""

from __future__ import annotations

from typing import Dict

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast


class TokenizerError(Exception):
    """model.path holds no loadable tokenizer: a user error (one line, exit code 2), not a traceback."""


SPECIALS = ("<s>", "</s>", "<pad>")
BYTE_VOCAB = 256 + len(SPECIALS)


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    for i, tok in enumerate(SPECIALS):
        vocab[tok] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=1 << 30
    )


def load_tokenizer(model_path: str | None) -> PreTrainedTokenizerBase:
    if model_path is None:
        return byte_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, a missing sentencepiece...: one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TokenizerError(f"model.path: cannot load a tokenizer from {model_path}: {first}") from None
