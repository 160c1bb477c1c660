"""The slot KV cache: preallocated per-layer pools that every request's keys and values live in.

Layout: one tensor per decoder layer, `[2 (K, V), kv_heads, pool_rows, head_dim]`, on that layer's device.
A slot is a range of pool rows `[offset, offset + capacity)`; slots may differ in size (a few long ones beside
shorter ones, as the memory plan decides). A request owns one slot from admission to finish, and the K/V of
its token at position p sit at row `offset + p`: joining or leaving a batch copies nothing.

A slot keeps the ids whose K/V it holds after its request finishes (free but warm): `glm4.engine.prefix`
admits a later prompt that starts with them to that slot and prefills only the rest. The last row of every
pool is scratch: padding rows of a fixed-shape decode step read and write there.

`update()` is what transformers' attention layers call (`cache.update(keys, values, layer_idx, ...)`); the
runner sets `address` before each forward pass to say which rows the pass writes and reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Slot:
    index: int
    offset: int  # first pool row
    capacity: int  # tokens it holds at most (prompt + reply)
    ids: list[int] = field(default_factory=list)  # tokens whose K/V rows are written, positions 0..len-1
    salt: str = ""  # who computed them (prefix reuse never crosses salts)
    hint: str | None = None  # cache_hint (prompt_cache_key) of the request that last used it
    owner: str | None = None  # id of the request running in it; None = free (maybe warm)
    last_used: float = 0.0

    @property
    def length(self) -> int:
        return len(self.ids)

    def id_array(self) -> np.ndarray:
        return np.asarray(self.ids, dtype=np.int64)


@dataclass
class PrefillAddress:
    """One slot: write rows [start, start + count) of it, attend to rows [0, start + count)."""

    offset: int
    start: int
    count: int


@dataclass
class DecodeAddress:
    """One new token per row. `write` [B]: the pool row each row's new K/V goes to. Reads: either `view`
    (offset, length) for a lone row (a plain slice of the pool, no copy), or `read` [B, T]: the pool rows each
    row attends to, gathered (rows past a row's length are masked by the caller)."""

    write: torch.Tensor
    read: torch.Tensor | None = None
    view: tuple[int, int] | None = None
    _on: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The index tensors on a layer's device (a model split over devices has pools on each)."""
        if device not in self._on:
            self._on[device] = (self.write.to(device), None if self.read is None else self.read.to(device))
        return self._on[device]


class SlotKVCache:
    """Per-layer pools and the slot table. Only the engine's worker thread touches it."""

    def __init__(self, layer_devices: list[torch.device], kv_heads: int, head_dim: int, dtype: torch.dtype,
                 capacities: list[int]):
        if not capacities or min(capacities) < 2:
            raise ValueError(f"slot capacities must be at least 2 tokens each, got {capacities}")
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.slots: list[Slot] = []
        offset = 0
        for index, capacity in enumerate(capacities):
            self.slots.append(Slot(index, offset, capacity))
            offset += capacity
        self.scratch_row = offset  # one spare row: padding rows of fixed-shape steps point here
        self.rows = offset + 1
        # torch.empty: on CPU the OS commits pages only when a slot is written, so idle capacity costs nothing
        self.pools = [torch.empty(2, kv_heads, self.rows, head_dim, dtype=dtype, device=device)
                      for device in layer_devices]
        self.address: PrefillAddress | DecodeAddress | None = None
        self.copies = 0  # K/V copies between slots or to/from the host cache (tests count them)

    @property
    def max_capacity(self) -> int:
        return max(slot.capacity for slot in self.slots)

    @property
    def bytes(self) -> int:
        return sum(pool.numel() * pool.element_size() for pool in self.pools)

    def token_bytes(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size() * len(self.pools)

    # ---- the transformers Cache interface the attention layers call ----

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states/value_states: [B, kv_heads, q_len, head_dim]. Returns the K/V to attend to."""
        pool, address = self.pools[layer_idx], self.address
        if isinstance(address, PrefillAddress):
            begin = address.offset + address.start
            pool[0, :, begin:begin + address.count] = key_states[0]
            pool[1, :, begin:begin + address.count] = value_states[0]
            end = begin + address.count
            return pool[0, :, address.offset:end].unsqueeze(0), pool[1, :, address.offset:end].unsqueeze(0)
        write, read = address.on(pool.device)
        pool[0].index_copy_(1, write, key_states[:, :, 0].transpose(0, 1))  # [kv, B, d] into rows `write`
        pool[1].index_copy_(1, write, value_states[:, :, 0].transpose(0, 1))
        if address.view is not None:
            offset, length = address.view
            return pool[0, :, offset:offset + length].unsqueeze(0), pool[1, :, offset:offset + length].unsqueeze(0)
        batch, span = read.shape
        flat = read.reshape(-1)
        keys = pool[0].index_select(1, flat).view(self.kv_heads, batch, span, self.head_dim).transpose(0, 1)
        values = pool[1].index_select(1, flat).view(self.kv_heads, batch, span, self.head_dim).transpose(0, 1)
        return keys, values

    # ---- moving prefixes (prefix reuse) ----

    def copy_prefix(self, source: Slot, target: Slot, length: int) -> None:
        """The first `length` rows of `source` into `target` on the device, one copy per layer."""
        for pool in self.pools:
            pool[:, :, target.offset:target.offset + length] = pool[:, :, source.offset:source.offset + length]
        self.copies += 1
        target.ids = source.ids[:length]

    def read_prefix(self, slot: Slot, length: int, pin: bool) -> list[torch.Tensor]:
        """The first `length` rows of a slot as host tensors [2, kv, length, d], one per layer."""
        layers = []
        for pool in self.pools:
            host = torch.empty(2, self.kv_heads, length, self.head_dim, dtype=self.dtype, pin_memory=pin)
            host.copy_(pool[:, :, slot.offset:slot.offset + length], non_blocking=pin)
            layers.append(host)
        self.copies += 1
        return layers

    def write_prefix(self, slot: Slot, layers: list[torch.Tensor], ids: list[int]) -> None:
        """Host tensors from `read_prefix` back into a slot's first rows."""
        length = len(ids)
        for pool, host in zip(self.pools, layers):
            pool[:, :, slot.offset:slot.offset + length].copy_(host[:, :, :length], non_blocking=host.is_pinned())
        self.copies += 1
        slot.ids = list(ids)


@dataclass
class HostEntry:
    ids: np.ndarray
    salt: str
    hint: str | None
    layers: list[torch.Tensor]
    nbytes: int
    last_used: float = field(default_factory=time.monotonic)


class HostPromptCache:
    """Warm KV moved off the device when its slot is reused: bounded in bytes, least recently used out first.

    Pinned host memory on CUDA (copies run without staging), plain tensors on CPU.
    """

    def __init__(self, capacity_bytes: int, pin: bool):
        self.capacity_bytes = max(0, int(capacity_bytes))
        self.pin = pin
        self.entries: list[HostEntry] = []
        self.hits = 0  # admissions that restored KV from here
        self.stored = 0  # entries ever put

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @property
    def used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)

    def covers(self, ids: np.ndarray, salt: str) -> bool:
        """Whether an entry already holds these ids (or more)."""
        return any(entry.salt == salt and len(entry.ids) >= len(ids) and np.array_equal(entry.ids[:len(ids)], ids)
                   for entry in self.entries)

    def put(self, ids: np.ndarray, salt: str, hint: str | None, layers: list[torch.Tensor]) -> bool:
        nbytes = sum(layer.numel() * layer.element_size() for layer in layers)
        if nbytes > self.capacity_bytes:
            return False
        # an entry this one extends says nothing new: replace it
        self.entries = [entry for entry in self.entries
                        if not (entry.salt == salt and len(entry.ids) <= len(ids)
                                and np.array_equal(ids[:len(entry.ids)], entry.ids))]
        while self.entries and self.used_bytes + nbytes > self.capacity_bytes:
            self.entries.remove(min(self.entries, key=lambda entry: entry.last_used))
        self.entries.append(HostEntry(ids, salt, hint, layers, nbytes))
        self.stored += 1
        return True

    def clear(self) -> None:
        self.entries.clear()
