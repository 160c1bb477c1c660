"""Next-token choice for one decode step of a batch, each row with its own SamplingParams.

Order (as in HF / vLLM): guard → allowed-prefix constraint → penalties → temperature → top-k → top-p → draw.
"""

from __future__ import annotations

import torch

from glm4.engine.base import SamplingParams


def guard_logits(logits: torch.Tensor) -> torch.Tensor:
    """fp16 GLM-4 can overflow to inf/NaN: compute in fp32 and replace non-finite values so sampling never crashes."""
    logits = logits.float()
    if not torch.isfinite(logits).all():
        logits = torch.nan_to_num(logits, nan=-1e4, posinf=1e4, neginf=-1e4)
    return logits


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


def restrict_top_k_top_p(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and 0 < top_k < row.numel():
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return row


def choose_token(row: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy when temperature is 0, else a draw from the restricted, tempered distribution."""
    if params.greedy:
        return int(torch.argmax(row))
    row = restrict_top_k_top_p(row / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(row, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: torch.Tensor, rows: list) -> list[int]:
    """logits: [B, vocab] for the last position; rows: the batch's request states (same order)."""
    logits = guard_logits(logits)
    if all(state.params.greedy and state.plain for state in rows):  # the common fast path: one argmax
        return logits.argmax(dim=-1).tolist()
    chosen = []
    for i, state in enumerate(rows):
        row = logits[i]
        allowed = state.allowed_next_tokens()
        if allowed is not None:
            mask = torch.full_like(row, float("-inf"))
            mask[allowed] = 0.0
            row = row + mask
        row = apply_penalties(row.clone(), state.params, state.prompt_tensor, state.output_tensor())
        chosen.append(choose_token(row, state.params, state.generator_for(row.device)))
    return chosen
