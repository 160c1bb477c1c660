"""The running batch: per-request state plus one left-padded KV cache that rows join and leave.

A request is prefilled alone (batch of 1, no padding), then its cache is left-padded to the batch's
length and concatenated (TGI's concatenate). Finished rows are dropped with `filter`, which also trims
columns that became padding for every row. Pure tensor work, no I/O.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from glm4.engine.base import SamplingParams
from glm4.engine.text import ReplyText


@dataclass
class RequestState:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    reply: ReplyText
    max_new_tokens: int  # params.max_tokens clipped to what the context window leaves
    emit: object  # callable(Delta) that hands a delta to the request's consumer (thread-safe)
    fault: str | None = None  # test hook: "error" or "oom" raised on this request's decode step
    output_ids: list[int] = field(default_factory=list)
    unsent_ids: list[int] = field(default_factory=list)  # sampled, not yet in a delta (text held back)
    first_token_at: float | None = None
    _generator: torch.Generator | None = None
    _prompt_tensor: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        """No penalties and no constraint: greedy rows like this can share one argmax."""
        p = self.params
        return (p.allowed_prefixes is None and p.repetition_penalty == 1.0
                and not p.presence_penalty and not p.frequency_penalty)

    @property
    def prompt_tensor(self) -> torch.Tensor:
        if self._prompt_tensor is None:
            self._prompt_tensor = torch.tensor(self.prompt_ids, dtype=torch.long)
        return self._prompt_tensor

    def output_tensor(self) -> torch.Tensor:
        return torch.tensor(self.output_ids, dtype=torch.long)

    def generator_for(self, device: torch.device) -> torch.Generator:
        """One generator per request, so a seeded request draws the same numbers in any batch."""
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
            self._generator.manual_seed(seed)
        return self._generator

    def allowed_next_tokens(self) -> list[int] | None:
        """Tokens that keep the output on one of the allowed prefixes; None once it is past them."""
        if not self.params.allowed_prefixes:
            return None
        done = len(self.output_ids)
        candidates = {prefix[done] for prefix in self.params.allowed_prefixes
                      if len(prefix) > done and prefix[:done] == self.output_ids}
        return sorted(candidates) or None


def pad_left(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = amount
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers with room for more tokens.

    DynamicLayer.update concatenates, copying the whole cache every decode step; with a batch that
    copy was ~40% of a step's CPU time on the tiny model (B=8). Here a step writes its column in
    place, and the buffers grow by ROOM tokens when full. The model sees the same values.
    """

    ROOM = 256  # tokens of headroom per (re)allocation: a copy every ROOM steps, ROOM x rows of spare memory

    @classmethod
    def adopting(cls, layer: DynamicLayer) -> "RoomyLayer":
        roomy = cls()
        roomy.adopt(layer.keys, layer.values)
        return roomy

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take these keys/values [B, heads, T, head_dim] (copied into fresh buffers with room)."""
        batch, heads, length, dim = keys.shape
        self._keys = keys.new_empty(batch, heads, length + self.ROOM, dim)
        self._values = values.new_empty(batch, values.shape[1], length + self.ROOM, values.shape[-1])
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if length + new > self._keys.shape[-2]:
            self.adopt(self.keys, self.values)
        self._keys[:, :, length:length + new] = key_states
        self._values[:, :, length:length + new] = value_states
        self.keys, self.values = self._keys[:, :, :length + new], self._values[:, :, :length + new]
        return self.keys, self.values


def with_room(cache: DynamicCache) -> DynamicCache:
    """The same cache with RoomyLayers (plain DynamicLayers only; other layer kinds are kept)."""
    cache.layers = [RoomyLayer.adopting(layer) if type(layer) is DynamicLayer and layer.is_initialized else layer
                    for layer in cache.layers]
    return cache


def set_layer(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(layer, RoomyLayer):
        layer.adopt(keys, values)
    else:
        layer.keys, layer.values = keys, values


class Batch:
    """Rows decoding together. mask: [B, T] with 0 where a row's cache holds left padding.

    With a StaticDecoder (--compile), a request that starts alone decodes on the static cache
    ("solo" mode); the first request to join moves it to the dynamic cache.
    """

    def __init__(self, device: torch.device, static=None):
        self.device = device  # where input ids, mask and positions live (the embedding's device)
        self.static = static  # glm4.engine.compiled.StaticDecoder, or None
        self.solo = False  # the one row lives in self.static's cache
        self.rows: list[RequestState] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, T]
        self.positions: torch.Tensor | None = None  # [B] position id of each row's next token
        self.lengths: list[int] = []  # the same positions on the CPU: tells padding apart without a GPU sync
        self.next_tokens: list[int] = []  # the token each row feeds at the next decode step

    def __len__(self) -> int:
        return len(self.rows)

    def add_solo(self, state: RequestState, first_token: int) -> None:
        """The only request, prefilled on the static cache by self.static."""
        self.rows, self.next_tokens, self.solo = [state], [first_token], True

    def leave_solo(self) -> None:
        """Copy the solo row's static cache into the dynamic batch layout, so others can join."""
        state, token = self.rows[0], self.next_tokens[0]
        self.rows, self.next_tokens, self.solo = [], [], False
        self.add(state, self.static.to_dynamic(), token, length=self.static.length)

    def add(self, state: RequestState, cache: DynamicCache, first_token: int, length: int | None = None) -> None:
        """Join a request whose cache (batch size 1, no padding) holds `length` tokens (its prompt by default)."""
        if self.solo:
            self.leave_solo()
        length = len(state.prompt_ids) if length is None else length
        row_mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        row_position = torch.tensor([length], dtype=torch.long, device=self.device)
        if not self.rows:
            self.cache, self.mask, self.positions = with_room(cache), row_mask, row_position
            self.lengths = []
        else:
            width = max(self.mask.shape[1], length)
            for mine, theirs in zip(self.cache.layers, cache.layers):
                grow, pad = width - mine.keys.shape[-2], width - length
                set_layer(mine, torch.cat([pad_left(mine.keys, grow, -2), pad_left(theirs.keys, pad, -2)], dim=0),
                          torch.cat([pad_left(mine.values, grow, -2), pad_left(theirs.values, pad, -2)], dim=0))
            self.mask = torch.cat([pad_left(self.mask, width - self.mask.shape[1], 1),
                                   pad_left(row_mask, width - length, 1)], dim=0)
            self.positions = torch.cat([self.positions, row_position])
        self.rows.append(state)
        self.next_tokens.append(first_token)
        self.lengths.append(length)

    def filter(self, keep: list[int]) -> None:
        """Keep only the rows at these indices, then trim columns that are padding in every row."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.solo = False
            self.rows, self.next_tokens, self.lengths = [], [], []
            self.cache = self.mask = self.positions = None
            return
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.next_tokens = [self.next_tokens[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        self.mask = self.mask[index.to(self.device)]
        self.positions = self.positions[index.to(self.device)]
        start = self.mask.shape[1] - max(self.lengths)  # first column any row still uses
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer_index = index.to(layer.keys.device)
            set_layer(layer, layer.keys[layer_index, :, start:], layer.values[layer_index, :, start:])

    def step_logits(self, model) -> torch.Tensor:
        """One decode step for every row: logits [B, vocab] of each row's next token."""
        if self.solo:
            return self.static.step(self.next_tokens[0])
        return model(**self.decode_inputs()).logits[:, -1, :]

    def decode_inputs(self) -> dict:
        """Model kwargs for one decode step: each row feeds its last token at its own position."""
        ones = torch.ones(len(self.rows), 1, dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        padded = min(self.lengths) < self.mask.shape[1] - 1  # some row's cache starts with padding
        inputs = dict(
            input_ids=torch.tensor(self.next_tokens, dtype=torch.long, device=self.device)[:, None],
            # No padding → no mask: attention can then take the fused causal kernel (flash/SDPA is_causal).
            attention_mask=self.mask if padded else None,
            position_ids=self.positions[:, None],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.positions = self.positions + 1
        self.lengths = [length + 1 for length in self.lengths]
        return inputs
