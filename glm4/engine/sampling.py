"""Next-token choice for one decode step of a batch, each row with its own SamplingParams, on the device.

Order (as in HF / vLLM): logprobs of the raw logits → non-finite check → grammar mask and allowed-prefix
constraint → penalties → temperature → top-k → top-p → draw. Constraints and penalties are per row; the rest
runs once for all sampled rows. The host sees the result through ONE copy at the end (`Sampled`): the token
ids, with -1 for a row whose logits were not finite (fp16 overflow: that request fails alone), and the
logprob values when some row asked for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm4.engine.base import SamplingParams
from glm4.engine.constraints import apply_bitmask

MAX_TOP_LOGPROBS = 20


def guard_logits(logits: torch.Tensor) -> torch.Tensor:
    """fp32, with non-finite values replaced so sampling never crashes (the row is failed by the caller)."""
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


def plain_greedy(state) -> bool:
    """Greedy, and nothing to mask, penalize or report: argmax of the raw logits is the answer."""
    params = state.params
    return params.greedy and params.logprobs is None and not has_penalties(params) \
        and state.allowed_next_tokens() is None


def has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)


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


def draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token index per row of logits [S, vocab], by inverse CDF of the softmax with the given uniforms [S]
    (each row's from its own generator: a seeded request draws the same numbers in any batch)."""
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # [S, vocab]
    target = (uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None]  # scaled: rounding never overshoots
    return torch.searchsorted(cdf, target, right=True).clamp_(max=logits.shape[-1] - 1)[:, 0]  # right: skips p=0


@dataclass
class Sampled:
    """One step's result on the host. tokens[i] == -1: row i's logits were not finite."""

    tokens: list[int]
    logprobs: list[tuple[float, list[int], list[float]] | None]  # per row: (chosen, top ids, top logprobs)


def sample_step(logits: torch.Tensor, rows: list, bitmask: torch.Tensor | None = None,
                masked: list[bool] | None = None) -> Sampled:
    """logits: [B, vocab] fp32 for the last position; rows: the request states (same order), each with
    `.params`, `.allowed_next_tokens()`, `.prompt_tensor`, `.output_tensor()`, `.uniform()`.
    bitmask [B, W] int32 with masked[i] True where row i's grammar constrains this step."""
    if not (masked and any(masked)) and all(plain_greedy(state) for state in rows):  # the common case: argmax
        finite = torch.isfinite(logits).all(dim=-1)
        chosen = logits.argmax(dim=-1)
        return Sampled(torch.where(finite, chosen, torch.full_like(chosen, -1)).tolist(), [None] * len(rows))
    wants = [i for i, state in enumerate(rows) if state.params.logprobs is not None]
    if wants:
        index = torch.tensor(wants, device=logits.device)
        raw = torch.log_softmax(logits.index_select(0, index), dim=-1)  # the model's own distribution
    finite = torch.isfinite(logits).all(dim=-1)  # [B]
    logits = guard_logits(logits)
    if masked and any(masked):
        apply_bitmask(logits, bitmask, [i for i, m in enumerate(masked) if m])
    for i, state in enumerate(rows):
        prefix = state.allowed_next_tokens()
        if prefix is not None:
            keep = logits[i, prefix].clone()
            logits[i].fill_(float("-inf"))
            logits[i, prefix] = keep
        if has_penalties(state.params):
            apply_penalties(logits[i], state.params, state.prompt_tensor, state.output_tensor())
    chosen = logits.argmax(dim=-1)  # greedy rows (and the default for the others)
    sampled = [i for i, state in enumerate(rows) if not state.params.greedy]
    if sampled:
        params = [rows[i].params for i in sampled]
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([p.temperature for p in params], device=logits.device)
        tempered = logits.index_select(0, index) / temperature[:, None]  # [S, vocab]
        # A tiny repetition_penalty or temperature can push allowed logits to +inf; two of them make the softmax
        # NaN, and the draw would fall on the last id whatever the mask refused. Capped, they stay the most likely.
        tempered = tempered.clamp(max=torch.finfo(tempered.dtype).max)
        restricted, order = restrict_top_k_top_p(tempered, [p.top_k for p in params], [p.top_p for p in params])
        uniforms = torch.tensor([rows[i].uniform() for i in sampled])
        picks = draw(restricted, uniforms)  # [S]
        if order is not None:
            picks = order.gather(1, picks[:, None])[:, 0]
        chosen = chosen.index_copy(0, index, picks)
    tokens = torch.where(finite, chosen, torch.full_like(chosen, -1))
    if not wants:
        return Sampled(tokens.tolist(), [None] * len(rows))
    top = max(rows[i].params.logprobs for i in wants)
    picked = tokens.index_select(0, torch.tensor(wants, device=tokens.device)).clamp(min=0)
    chosen_lp = raw.gather(1, picked[:, None])[:, 0]
    top_lp, top_ids = raw.topk(top, dim=-1) if top else (raw[:, :0], raw[:, :0].long())
    host_tokens = tokens.tolist()
    chosen_lp, top_ids, top_lp = chosen_lp.tolist(), top_ids.tolist(), top_lp.tolist()
    logprobs: list = [None] * len(rows)
    for j, i in enumerate(wants):
        n = rows[i].params.logprobs
        logprobs[i] = (chosen_lp[j], top_ids[j][:n], top_lp[j][:n])
    return Sampled(host_tokens, logprobs)
