"""The MNTP attention really is bidirectional, and padding stays invisible."""

from __future__ import annotations

import torch

from shared.ml.mntp import bidirectional_mask, mask_tokens
from shared.ml.models import load_model


def _logits(model, ids, attention=None, eager=False):
    kwargs = {} if attention is None else {"attention_mask": bidirectional_mask(attention, eager=eager)}
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_position_zero_sees_a_later_token(model_cache):
    model = load_model("tiny", model_cache).model.eval()
    ids = torch.tensor([[101, 202, 303, 404, 505, 606]])
    changed = ids.clone()
    changed[0, 4] = 9999
    real = torch.ones_like(ids)

    # Bidirectional: the first position's output depends on token 4.
    assert not torch.allclose(_logits(model, ids, real)[0, 0], _logits(model, changed, real)[0, 0])
    # Causal (no mask given): it cannot, which shows the mask is what makes the difference.
    assert torch.allclose(_logits(model, ids)[0, 0], _logits(model, changed)[0, 0], atol=1e-6)


def test_padded_keys_are_invisible(model_cache):
    model = load_model("tiny", model_cache).model.eval()
    pad = 2
    short = torch.tensor([[101, 202, 303, 404]])
    batch = torch.tensor([[101, 202, 303, 404, pad, pad, pad], [11, 22, 33, 44, 55, 66, 77]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * 7])

    alone = _logits(model, short, torch.ones_like(short))
    padded = _logits(model, batch, attention)
    assert torch.isfinite(padded).all()
    assert torch.allclose(alone[0], padded[0, :4], atol=1e-5)


def test_eager_kernel_gets_an_equivalent_additive_mask(model_cache):
    model = load_model("tiny", model_cache).model.eval()
    ids = torch.tensor([[101, 202, 303, 2, 2], [11, 22, 33, 44, 55]])
    attention = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    sdpa = _logits(model, ids, attention)
    model.set_attn_implementation("eager")
    eager = _logits(model, ids, attention, eager=True)
    assert torch.allclose(sdpa, eager, atol=1e-5)


def test_masking_skips_position_zero_and_padding():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 1000, (64, 40), generator=generator)
    attention = torch.ones_like(ids)
    attention[::2, 30:] = 0  # half the rows padded
    masked, labels = mask_tokens(ids, attention, mask_id=79, ratio=0.2, generator=torch.Generator().manual_seed(0))

    chosen = labels != -100
    assert not chosen[:, 0].any()
    assert not chosen[attention == 0].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert (masked[chosen] == 79).all() and torch.equal(masked[~chosen], ids[~chosen])
    share = chosen.sum().item() / (attention[:, 1:].sum().item())
    assert 0.17 < share < 0.23
    again, _ = mask_tokens(ids, attention, 79, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(masked, again)


def test_every_row_gets_a_masked_token():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    _, labels = mask_tokens(ids, torch.ones_like(ids), 79, 0.01, torch.Generator().manual_seed(0))
    assert ((labels != -100).sum(dim=1) >= 1).all()
