"""Packed rows keep records apart: each record in a packed row gets the logits, loss and gradients it gets
alone (fp32, tolerance 1e-5), for every family the launcher trains (sdpa and eager); what undoes it (an
all-ones attention_mask, an enabled KV cache) is shown to; the planner's packed-attention term matches the
saved tensors; and the loss normalisation makes micro batch, accumulation and world size irrelevant."""

from __future__ import annotations

import numpy as np
import pytest
from sft_fixtures import config_for

from launcher.data.pack import pack_fit
from launcher.worker.data import SampleOrder, global_targets, micro_batches

torch = pytest.importorskip("torch")
F = torch.nn.functional
VOCAB, SEQ = 96, 48


def tiny(kind: str, attn: str):
    from transformers import AutoModelForCausalLM

    import launcher.worker.attention  # noqa: F401  (registers packed_sdpa, what CPU ranks run for sdpa)

    config = config_for(kind, dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ))
    config._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().train()


def records(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in (17, 9, 13):
        ids = rng.integers(1, VOCAB, n).tolist()
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        out.append((ids, mask))
    return out


def loss_sum(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


@pytest.mark.parametrize("kind,attn", [("qwen2", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"),
                                       ("gemma2", "eager"), ("llama", "packed_sdpa"), ("qwen2", "packed_sdpa")])
def test_packed_row_equals_each_record_alone(kind, attn):
    model = tiny(kind, attn)
    recs = records()
    packed = pack_fit(recs, SEQ, pad_id=0)
    assert len(packed) == 1  # 17 + 9 + 13 = 39 tokens and 9 of padding in one row
    ids, pos = torch.from_numpy(packed.input_ids), torch.from_numpy(packed.position_ids)
    labels = torch.from_numpy(np.where(packed.loss_mask == 1, packed.input_ids, -100))
    out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    loss_sum(out, labels).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    at = 0
    for rec_ids, rec_mask in recs:
        n = len(rec_ids)
        alone = model(input_ids=torch.tensor([rec_ids]), use_cache=False).logits
        torch.testing.assert_close(out[:, at:at + n], alone, rtol=1e-5, atol=1e-5)
        rec_labels = torch.tensor([[i if m else -100 for i, m in zip(rec_ids, rec_mask)]])
        rec_labels[0, 0] = -100
        loss_sum(alone, rec_labels).backward()  # gradients accumulate over the records
        at += n
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_sdpa_equals_masked_sdpa_on_a_micro_batch_of_rows():
    """Two packed rows (records cut at different places): CPU ranks' record-by-record SDPA gives transformers'
    block-diagonal-mask sdpa logits and gradients; and the launcher picks it for `sdpa` on CPU only."""
    from launcher.worker.attention import PACKED_SDPA, resolve

    assert resolve("sdpa", "cpu", "fp32") == PACKED_SDPA and resolve("sdpa", "cuda", "fp32") == "sdpa"
    assert resolve("sdpa", "cpu", "bf16") == "sdpa"  # the reduced-precision CPU kernel keeps a kernel per shape
    assert resolve("eager", "cpu", "fp32") == "eager"
    assert resolve("flash_attention_2", "cuda", "bf16") == "flash_attention_2"
    packed = pack_fit(records(0) + records(1)[::-1] + records(2)[:1], SEQ, pad_id=0)
    assert len(packed) == 2
    ids, pos = torch.from_numpy(packed.input_ids), torch.from_numpy(packed.position_ids)
    labels = torch.from_numpy(np.where(packed.loss_mask == 1, packed.input_ids, -100))
    results = []
    for attn in ("sdpa", PACKED_SDPA):
        model = tiny("llama", attn)
        out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss_sum(out, labels).backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (masked, masked_grads), (per_record, grads) = results
    torch.testing.assert_close(per_record, masked, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, masked_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_what_undoes_the_separation():
    """transformers builds the block-diagonal mask only with no attention_mask and no cache."""
    model = tiny("qwen2", "sdpa")
    packed = pack_fit(records(), SEQ, pad_id=0)
    ids, pos = torch.from_numpy(packed.input_ids), torch.from_numpy(packed.position_ids)
    with torch.no_grad():
        good = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        ones = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False).logits
        cached = model(input_ids=ids, position_ids=pos, use_cache=True).logits
    second = slice(17, 26)  # the second record attends to the first when the separation is lost
    assert not torch.allclose(good[:, second], ones[:, second], atol=1e-3)
    assert not torch.allclose(good[:, second], cached[:, second], atol=1e-3)


@pytest.mark.parametrize("attn,layout", [("sdpa", "masked"), ("packed_sdpa", "per_record")])
def test_planner_packed_attention_term_matches_saved_tensors(attn, layout):
    from launcher.plan.activations import packed_attention_bytes
    from launcher.plan.params import ModelShape

    model = tiny("llama", attn)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    micro = 2

    def saved_bytes(**kw):
        saved = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                saved[s.data_ptr()] = s.nbytes()
            return t

        ids = torch.randint(0, VOCAB, (micro, SEQ))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False, **kw).loss.backward()
        return sum(saved.values())

    pos = torch.cat([torch.arange(30), torch.arange(SEQ - 30)]).expand(micro, SEQ)
    extra = saved_bytes(position_ids=pos) - saved_bytes()
    shape = ModelShape(VOCAB, 64, 128, 2, 4, 2, False)
    # + RoPE's cos/sin per row instead of one shared copy (2 x (micro - 1) x SEQ x head_dim fp32).
    assert extra == 2 * packed_attention_bytes(shape, micro, SEQ, 4, layout) + 2 * (micro - 1) * SEQ * 16 * 4


class ArrayRows:
    def __init__(self, packed):
        self.p = packed

    def row(self, i):
        ids = self.p.input_ids[i]
        return ids, np.where(self.p.loss_mask[i] == 1, ids, -100), self.p.position_ids[i]

    def targets(self, i):
        return int(self.p.loss_mask[i, 1:].sum())


def test_loss_normalisation_ignores_micro_accum_and_world():
    """The worker's rule (each micro batch: sum / (global targets / world); gradients averaged over ranks; no
    division by accumulation) gives the same gradients for micro 4 x accum 1, micro 1 x accum 4 and 2 ranks x
    micro 1 x accum 2, although rows hold very different numbers of targets."""
    rng = np.random.default_rng(1)
    recs = [(rng.integers(1, VOCAB, n).tolist(), [int(x) for x in rng.integers(0, 2, n)])
            for n in rng.integers(5, SEQ, 24)]
    rows = ArrayRows(pack_fit(recs, SEQ, pad_id=0))
    order = SampleOrder(len(rows.p), seed=0)
    model = tiny("llama", "sdpa")

    def grads(micro, accum, world):
        total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        per_rank = global_targets(rows, order, 0, 4) / world
        for rank in range(world):
            model.zero_grad()
            for b in micro_batches(rows, order, 0, 4, micro, accum, rank, world):
                t = {k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items()}
                model(**t, use_cache=False, num_items_in_batch=per_rank).loss.backward()
            for n, p in model.named_parameters():
                total[n] += p.grad / world  # DeepSpeed averages gradients over data-parallel ranks
        return total

    counts = [rows.targets(order.row(i)) for i in range(4)]
    assert len(set(counts)) > 1
    ref = grads(4, 1, 1)
    for micro, accum, world in ((1, 4, 1), (1, 2, 2), (2, 1, 2)):
        got = grads(micro, accum, world)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-7, msg=f"{micro}x{accum}x{world} {n}")
