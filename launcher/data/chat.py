"""Chat turns -> token ids and a trained-token mask, through the tokenizer's own chat template.

Many stock templates (Llama-3, Qwen3, Gemma) have no `{% generation %}` block, so
`return_assistant_tokens_mask` would return all zeros. Instead the assistant spans are found by prefix
diffing: for assistant turn i, the characters between render(turns[:i], add_generation_prompt=True) and
render(turns[:i+1]) are that reply *including* the template's end-of-turn text (`<|im_end|>`, `<|eot_id|>`),
so the model learns to stop. The full conversation is tokenized once, and a token is trained when its first
character lies in an assistant span (offsets from the fast tokenizer).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from launcher.data.records import DataError, RecordError

# Named fallback templates for tokenizers without one (data.chat_template=<name>).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML}


def resolve_template(tokenizer: Any, choice: str) -> str:
    """data.chat_template: auto (the tokenizer's own), a name in TEMPLATES, or a Jinja string."""
    if choice == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise DataError(
                "data.chat_template: the tokenizer of model.path has no chat template; "
                f"set data.chat_template={'|'.join(TEMPLATES)} (or a Jinja template string)"
            )
        return own
    return TEMPLATES.get(choice, choice)


def _render(tokenizer: Any, turns: Sequence[Dict[str, str]], template: str, prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(turns), chat_template=template, tokenize=False,
                                         add_generation_prompt=prompt)


def assistant_spans(
    tokenizer: Any, turns: Sequence[Dict[str, str]], template: str
) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant reply."""
    full = _render(tokenizer, turns, template, prompt=False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, turns[:i], template, prompt=True) if i else ""
        through = _render(tokenizer, turns[: i + 1], template, prompt=False)
        if not through.startswith(before) or not full.startswith(through):
            raise RecordError(
                "the chat template renders earlier turns differently once later turns follow (e.g. it drops "
                "past reasoning); set data.chat_template=chatml or a template whose renderings are prefixes"
            )
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return full, spans


def encode_chat(tokenizer: Any, turns: Sequence[Dict[str, str]], template: str) -> Tuple[List[int], List[int]]:
    """(input ids, mask) where mask[t] = 1 when token t is part of an assistant reply (it is a target)."""
    text, spans = assistant_spans(tokenizer, turns, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= start < spans[k][1] and end > start:
            mask[t] = 1
    return ids, mask


def encode_text(tokenizer: Any, texts: List[str], bos: Optional[int], eos: Optional[int]) -> List[Tuple[Any, None]]:
    """format=text: (bos) ids (eos) per document; every token but the first is a target (mask None = all)."""
    from launcher.data.text import encode

    head = [] if bos is None else [bos]
    tail = [] if eos is None else [eos]
    return [(head + list(map(int, ids)) + tail, None) for ids in encode(tokenizer, texts)]


def check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("model.path: chat formats need a fast tokenizer (tokenizer.json) for token offsets; "
                        "save the tokenizer with `tokenizers` installed, or use data.format=text")
