"""Text embeddings from the base model or an MNTP adapter, as in LLM2Vec.

An MNTP adapter is trained with bidirectional attention (``shared.ml.mntp``):
every position sees every real token of its text. Used as an encoder it runs
the same way: the decoder stack of the model (the adapter active, if any)
under ``bidirectional_mask``, called exactly as ``mntp.logits_at`` calls it
during training (right padding, the 4-D mask, default positions 0..L-1), and
the last hidden states are mean-pooled over the real tokens of each text.
The vectors are not normalised.

``embed_texts`` is the reference: the serving API embeds through it, with the
adapter it serves active on the model it is given.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from shared.ml.mntp import bidirectional_mask
from shared.ml.placement import model_device

__all__ = ["embed_texts"]


def embed_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = 512,
    batch_size: int = 16,
) -> tuple[list[list[float]], int]:
    """One mean-pooled vector per text, and the number of tokens embedded (all texts together).

    ``model`` is a causal LM or a ``PeftModel`` wrapping one; whichever adapter
    is active on it (or none, inside ``disable_adapter()``) is what embeds. A
    text longer than ``max_length`` tokens is cut to its first ``max_length``.
    Texts are embedded in batches of ``batch_size``, in order; the result for
    a text does not depend on what it is batched with (padding is hidden from
    every real position). Raises ``ValueError`` for a text with no token.
    Runs in eval mode without gradients; the model's mode is restored after.
    """
    if max_length < 1 or batch_size < 1:
        raise ValueError("max_length and batch_size must be at least 1")
    if not texts:
        return [], 0
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"text {empty[0]} has no token to embed")
    was_training = model.training
    model.eval()
    vectors: list[list[float]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                vectors.extend(_embed_batch(model, encoded[start : start + batch_size], tokenizer.pad_token_id))
    finally:
        model.train(was_training)
    return vectors, sum(len(ids) for ids in encoded)


def _embed_batch(model: Any, rows: list[list[int]], pad_id: int) -> list[list[float]]:
    """Mean-pooled last hidden states of one batch, padded on the right as ``MaskedBatches`` pads."""
    lengths = [len(r) for r in rows]
    width = max(lengths)
    device = model_device(model)
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    attention = (torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]).long()
    hidden = last_hidden_states(model, input_ids, attention).float()
    weights = attention.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
    return pooled.cpu().tolist()


def last_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) last hidden states under bidirectional attention, the model called as ``mntp.logits_at`` calls it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    eager = getattr(base.config, "_attn_implementation", "sdpa") == "eager"
    mask = bidirectional_mask(attention_mask, eager=eager)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is not None:
        return decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    out = model(input_ids=input_ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1]
