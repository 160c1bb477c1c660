"""Next-token choice for one decode step of a batch, each row with its own SamplingParams.

Order (as in HF / vLLM): guard → allowed-prefix constraint → penalties → temperature → top-k → top-p → draw.
Constraints and penalties are per row; the rest runs once for all sampled rows of the batch.
"""

from __future__ import annotations

import torch

from glm4.engine.base import SamplingParams


def guard_logits(logits: torch.Tensor) -> torch.Tensor:
    """fp16 GLM-4 can overflow to inf/NaN: compute in fp32 and replace non-finite values so sampling never crashes."""
    # Unconditional: checking first (isfinite().all()) would stall the CPU on the GPU every step.
    return torch.nan_to_num(logits.float(), nan=-1e4, posinf=1e4, neginf=-1e4)


def apply_penalties(row: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor,
                    output_ids: torch.Tensor) -> torch.Tensor:
    """repetition_penalty over prompt + output (HF semantics); presence/frequency over output (OpenAI's)."""
    prompt_ids, output_ids = prompt_ids.to(row.device), output_ids.to(row.device)
    if params.repetition_penalty != 1.0:
        seen = torch.cat([prompt_ids, output_ids]).unique()
        scores = row[seen]
        row[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids.numel():
        counts = torch.bincount(output_ids, minlength=row.numel()).to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
    return row


def constrain_and_penalize(row: torch.Tensor, state) -> None:
    """In place, for one row [vocab]: the allowed-prefix constraint, then the penalties."""
    allowed = state.allowed_next_tokens()
    if allowed is not None:
        keep = row[allowed].clone()
        row.fill_(float("-inf"))
        row[allowed] = keep
    params = state.params
    if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
        row.copy_(apply_penalties(row, params, state.prompt_tensor, state.output_tensor()))


def restrict_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: [S, vocab], already tempered. Returns (logits to draw from, their vocab ids or None).

    Rows are sorted once when any row uses top-k or top-p; the draw then happens in sorted order and
    `order` maps it back to token ids (no scatter back).
    """
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    ps = [p if 0.0 < p < 1.0 else 1.0 for p in top_p]
    if all(k == vocab for k in ks) and all(p == 1.0 for p in ps):
        return logits, None
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [S, vocab]
    rank = torch.arange(vocab, device=logits.device)
    if any(k < vocab for k in ks):
        k_limit = torch.tensor(ks, device=logits.device)[:, None]  # [S, 1]
        sorted_logits = sorted_logits.masked_fill(rank >= k_limit, float("-inf"))
    if any(p < 1.0 for p in ps):
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the better tokens: keep the token that crosses top_p
        p_limit = torch.tensor(ps, device=logits.device, dtype=probs.dtype)[:, None]
        sorted_logits = sorted_logits.masked_fill((before >= p_limit) & (rank > 0), float("-inf"))
    return sorted_logits, order


def draw(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token index per row of logits [S, vocab]; row i uses only generators[i] (seeded requests
    draw the same numbers whatever else is in the batch). Inverse CDF of the softmax."""
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # [S, vocab]
    uniforms = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generators])  # [S]
    target = (uniforms * cdf[:, -1])[:, None]  # scaled by the total: float rounding never overshoots
    return torch.searchsorted(cdf, target, right=True).clamp_(max=logits.shape[-1] - 1)[:, 0]  # right: skips p=0


def sample_batch(logits: torch.Tensor, rows: list) -> list[int]:
    """logits: [B, vocab] for the last position; rows: the batch's request states (same order).

    Per-row work only where a row needs it (constraints, penalties); temperature, top-k, top-p and
    the draw run once for all sampled rows.
    """
    logits = guard_logits(logits)
    if all(state.params.greedy and state.plain for state in rows):  # the common fast path: one argmax
        return logits.argmax(dim=-1).tolist()
    for i, state in enumerate(rows):
        if not state.plain:
            constrain_and_penalize(logits[i], state)
    sampled = [i for i, state in enumerate(rows) if not state.params.greedy]
    chosen = logits.argmax(dim=-1).tolist() if len(sampled) < len(rows) else [0] * len(rows)
    if sampled:
        params = [rows[i].params for i in sampled]
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
        tempered = logits.index_select(0, index) / temperature[:, None]  # [S, vocab]
        restricted, order = restrict_top_k_top_p(tempered, [p.top_k for p in params], [p.top_p for p in params])
        picks = draw(restricted, [rows[i].generator_for(logits.device) for i in sampled])  # [S]
        if order is not None:
            picks = order.gather(1, picks[:, None])[:, 0]
        for i, token in zip(sampled, picks.tolist()):
            chosen[i] = token
    return chosen
