"""Finetunes on a loaded pipeline: LoRA adapters loaded with diffusers into a bounded set of slots.

A request names at most one adapter (:class:`~fluxserve.engines.base.Adapter`: the finetune, where its
file is, its strength). :meth:`AdapterSlots.use` makes it the one active adapter before the pipeline runs,
under the model's lock:
an adapter already in a slot is only re-weighted (``set_adapters``), so that changing the strength costs
nothing; a new one takes a free slot or the least recently used one's. A reused slot is hot-swapped
(``load_lora_weights(..., hotswap=True)``: the weights replaced in place, nothing re-injected, a compiled
transformer not recompiled) where diffusers can, else emptied and loaded anew. A request without an adapter,
or at strength 0, runs with the adapters disabled: exactly the base model.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from safetensors.torch import load as load_safetensors

from fluxserve.engines.base import Adapter
from fluxserve.errors import EngineError

log = logging.getLogger("fluxserve.engines")


class AdapterSlots:
    """At most ``size`` adapters loaded in ``pipe``'s transformer, least recently used reused first.

    Not thread-safe on its own: call :meth:`use` with the model's lock held, as the pipeline call is.
    """

    def __init__(self, pipe: Any, size: int, after_load: Callable[[], None] = lambda: None) -> None:
        self._pipe = pipe
        self._size = size
        self._after_load = after_load  # run once an adapter has added its layers (FLUX.1: row-wise linears)
        self._slots: OrderedDict[str, str] = OrderedDict()  # file -> slot name, least recent first
        self._enabled = False

    @property
    def loaded(self) -> list[str]:
        """The files in slots, least recently used first."""
        return list(self._slots)

    def use(self, adapter: Adapter | None) -> dict[str, Any]:
        """Make ``adapter`` the one active adapter (None or strength 0: none); returns what the result's
        details record about it."""
        if adapter is None or adapter.strength == 0:
            if self._enabled:
                self._pipe.disable_lora()
                self._enabled = False
            return {} if adapter is None else noted(adapter)
        slot = self._slots.get(adapter.file)
        if slot is None:
            slot = self._load(adapter)
        self._slots.move_to_end(adapter.file)
        if not self._enabled:
            self._pipe.enable_lora()
            self._enabled = True
        self._pipe.set_adapters([slot], adapter_weights=[adapter.strength])
        return noted(adapter)

    def _load(self, adapter: Adapter) -> str:
        """Load the adapter into a free slot, or into the least recently used one's."""
        data = adapter.read()  # EngineError when the file is gone
        try:
            state = load_safetensors(data)
        except Exception as exc:
            raise EngineError(f"finetune_id: {adapter.name}: unreadable adapter file ({exc})"[:400]) from exc
        if len(self._slots) < self._size:
            slot = f"finetune_{len(self._slots)}"
            self._load_into(slot, state, adapter, hotswap=False)
        else:
            _, slot = self._slots.popitem(last=False)
            try:
                self._load_into(slot, state, adapter, hotswap=True)
            except EngineError as exc:  # another rank or other target layers: empty the slot, load anew
                log.info("adapter not hot-swappable; reloading its slot", extra={"reason": str(exc)})
                self._pipe.delete_adapters(slot)
                self._load_into(slot, state, adapter, hotswap=False)
        self._after_load()
        self._slots[adapter.file] = slot
        return slot

    def _load_into(self, slot: str, state: dict[str, Any], adapter: Adapter, hotswap: bool) -> None:
        from fluxserve.engines.flux.loading import short_reason  # loading builds these slots: import late

        try:
            self._pipe.load_lora_weights(dict(state), adapter_name=slot, hotswap=hotswap)
        except Exception as exc:
            if not hotswap and slot in self._pipe.get_list_adapters().get("transformer", []):
                self._pipe.delete_adapters(slot)  # a half-loaded adapter must not stay in the slot
            raise EngineError(f"finetune_id: {adapter.name}: cannot load it ({short_reason(exc)})") from exc


def noted(adapter: Adapter) -> dict[str, Any]:
    """What a result's details say about the finetune it ran with."""
    return {"finetune_id": adapter.name, "finetune_strength": adapter.strength}
