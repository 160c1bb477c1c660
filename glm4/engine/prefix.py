"""Which slot a new request goes to, and which already computed K/V it can reuse (the admission rule).

Token ids are compared, never text: BPE can split a re-rendered reply differently from the ids that were
generated, and only the ids say which K/V are valid. The rule, in order:

1. A free slot whose whole content is a prefix of the prompt (the previous turn of this conversation) is
   continued in place: nothing is copied, nothing is lost.
2. Otherwise the longest common prefix anywhere (any slot, running or free, or the host-memory cache), if it
   is at least MIN_REUSE_TOKENS long, is copied into the free slot that loses the least (an empty one, else
   the least recently used): agent sessions and front ends share one long instructions + tools prefix.
3. Otherwise the least recently used free slot, prefilled from token 0.

The slot must hold the prompt plus the reply budget (the smallest such free slot is preferred, so long slots
stay free for long requests). At least one prompt token is always prefilled, for the logits to sample from.
Reuse never crosses salts (the API key or UI user that computed the K/V): a shared cache would let one
tenant time another's prompts. `prompt_cache_key` (the hint) breaks ties toward that conversation's slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glm4.engine.kv import HostEntry, HostPromptCache, Slot

MIN_REUSE_TOKENS = 32  # every GLM-4 prompt shares its first few tokens; shorter matches are not worth a copy


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


@dataclass
class Admission:
    slot: Slot  # where the request runs
    reuse: int  # prompt tokens whose K/V it will not prefill
    source: Slot | HostEntry | None = None  # where those K/V come from; None = already in `slot`
    evict: bool = False  # the slot's warm content is overwritten: keep it in the host cache first

    @property
    def kind(self) -> str:
        if not self.reuse:
            return "cold"
        if self.source is None:
            return "in-place"
        return "host" if isinstance(self.source, HostEntry) else "slot-copy"


def choose_admission(prompt: np.ndarray, need: int, salt: str, hint: str | None, slots: list[Slot],
                     host: HostPromptCache | None, reuse_enabled: bool) -> Admission | None:
    """The admission for a prompt needing `need` tokens of capacity, or None while no free slot can hold it."""
    free = [slot for slot in slots if slot.owner is None and slot.capacity >= need]
    if not free:
        return None
    smallest = min(slot.capacity for slot in free)

    def least_valuable(slot: Slot):  # empty slots first, then the smallest, then the least recently used
        return (slot.length > 0, slot.capacity > smallest, slot.last_used)

    if not reuse_enabled:
        return Admission(min(free, key=least_valuable), 0, evict=False)
    usable = len(prompt) - 1  # keep one token to prefill
    matches = {slot.index: common_prefix_length(slot.id_array(), prompt) if slot.salt == salt and slot.length
               else 0 for slot in slots}

    def prefer(slot: Slot, length: int):
        return (min(length, usable), slot.hint is not None and slot.hint == hint, slot.last_used)

    continued = [slot for slot in free if matches[slot.index] == slot.length >= MIN_REUSE_TOKENS]
    if continued:
        slot = max(continued, key=lambda s: prefer(s, matches[s.index]))
        return Admission(slot, min(matches[slot.index], usable))

    best_slot = max(slots, key=lambda s: prefer(s, matches[s.index]))
    best_length = min(matches[best_slot.index], usable)
    entry, entry_length = None, 0
    if host is not None and host.enabled:
        for candidate in host.entries:
            if candidate.salt != salt:
                continue
            length = min(common_prefix_length(candidate.ids, prompt), usable)
            if (length, candidate.hint == hint) > (entry_length, entry is not None and entry.hint == hint):
                entry, entry_length = candidate, length
    target = min(free, key=least_valuable)
    if max(best_length, entry_length) < MIN_REUSE_TOKENS:
        return Admission(target, 0, evict=target.length > 0)
    if entry_length > best_length:
        return Admission(target, entry_length, entry, evict=target.length > 0)
    if best_slot is target:  # the best match is the slot we would take anyway: reuse in place, keep the rest
        return Admission(target, best_length, evict=target.length > best_length)
    return Admission(target, best_length, best_slot, evict=target.length > 0)
