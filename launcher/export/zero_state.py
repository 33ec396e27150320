"""Reading the ZeRO state: DeepSpeed's own consolidation (`deepspeed.utils.zero_to_fp32`, lazy mode) stitches
the fp32 master partitions each rank saved back into full tensors; with ZeRO-3 each tensor is gathered only
when it is read. Also the shapes the Hugging Face model expects, to check the checkpoint against."""

from __future__ import annotations

from typing import Any, Dict, Tuple

from launcher.errors import ExportError
from launcher.export.locate import Checkpoint


def consolidated_state_dict(ckpt: Checkpoint) -> Dict[str, Any]:
    """DeepSpeed's lazy consolidation: name -> tensor (ZeRO-1/2 views) or GatheredTensor (ZeRO-3)."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()
    try:
        # DeepSpeed prints progress lines and tqdm bars (on stderr) that say nothing useful here.
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.ckpt_dir), tag=ckpt.tag, lazy_mode=True)
    except Exception as exc:  # noqa: BLE001 - torch.load/pickle/DeepSpeed errors on damaged or missing shards
        raise ExportError(f"checkpoint {ckpt.path} is incomplete or unreadable: {_first_sentence(exc)}") from None


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text.split(". ")[0].rstrip(".")


def expected_shapes(config: Any) -> Tuple[Dict[str, Tuple[int, ...]], set]:
    """The HF model's state-dict shapes (built on the meta device: no memory), and its tied keys."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and in_emb is not None:
            for name, module in model.named_modules():
                if module is out_emb:
                    tied.add(f"{name}.weight")
    return shapes, tied
