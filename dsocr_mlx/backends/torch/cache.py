"""A small KV cache with the MLX cache's API, preallocated once (static shapes, gpt-fast style), in PyTorch."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one attention layer, ``(B, heads, T, head_dim)``, in a buffer of ``max_length``."""

    step = 256

    def __init__(self, max_length: int | None = None):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.offset = 0
        self.max_length = max_length

    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``keys``/``values`` at ``offset`` and return everything cached so far."""
        prev, n = self.offset, keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            B, heads, _, dk = keys.shape
            need = prev + n
            if self.max_length and need <= self.max_length:
                size = self.max_length
            else:
                size = ((need + self.step - 1) // self.step) * self.step
            new_k = keys.new_zeros((B, heads, size, dk))
            new_v = values.new_zeros((B, heads, size, values.shape[3]))
            if self.keys is not None:
                new_k[..., :prev, :] = self.keys[..., :prev, :]
                new_v[..., :prev, :] = self.values[..., :prev, :]
            self.keys, self.values = new_k, new_v
        self.offset += n
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.keys is None:
            return None, None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions; returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def attention_mask(self, length: int) -> str | None:
        """The mask of ``length`` new positions over this cache: causal among them (one needs none)."""
        return "causal" if length > 1 else None


class BatchKVCache:
    """Keys and values of one attention layer for a batch of sequences of different lengths.

    The rows are left-padded to a common end: row ``b``'s token at buffer index ``j`` sits at position
    ``j - padding[b]``, and every row writes its next token at ``end``. RoPE reads the per-row positions
    (``offset``), attention masks the padding (``attention_mask``). A row joins with its own prefilled
    :class:`KVCache` (:meth:`add`) and leaves between steps (:meth:`keep`), so the others never wait.
    """

    step = 256

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.end = 0
        self.padding: list[int] = []

    @property
    def offset(self) -> torch.Tensor:
        """``(B,)`` positions of each row's next token."""
        return torch.tensor([self.end - p for p in self.padding], device=self.keys.device)

    def attention_mask(self, length: int) -> torch.Tensor | None:
        """``(B, 1, 1, end + 1)`` booleans: row ``b`` sees its own keys, not its padding (one new position)."""
        if length != 1:
            raise ValueError("a batch decodes one position per row at a time; prefill each row alone")
        if not any(self.padding):
            return None
        columns = torch.arange(self.end + 1, device=self.keys.device)[None, :]
        padding = torch.tensor(self.padding, device=self.keys.device)[:, None]
        return (columns >= padding)[:, None, None, :]

    def _buffer(self, rows: int, capacity: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros((rows, like.shape[1], capacity, like.shape[3]))

    def _capacity(self, needed: int) -> int:
        return ((needed + self.step - 1) // self.step) * self.step

    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one position per row at ``end`` and return everything cached so far."""
        prev, n = self.end, keys.shape[2]
        if prev + n > self.keys.shape[2]:
            capacity = self._capacity(prev + n)
            new_k, new_v = self._buffer(keys.shape[0], capacity, keys), self._buffer(keys.shape[0], capacity, values)
            new_k[..., :prev, :], new_v[..., :prev, :] = self.keys[..., :prev, :], self.values[..., :prev, :]
            self.keys, self.values = new_k, new_v
        self.end += n
        self.keys[..., prev : self.end, :] = keys
        self.values[..., prev : self.end, :] = values
        return self.keys[..., : self.end, :], self.values[..., : self.end, :]

    def add(self, cache: KVCache) -> None:
        """Join a row prefilled alone into ``cache`` (batch 1), padding whichever side is shorter."""
        length = cache.offset
        keys, values = cache.keys[..., :length, :], cache.values[..., :length, :]
        if self.keys is None:
            capacity = self._capacity(length + 1)
            self.keys, self.values = self._buffer(1, capacity, keys), self._buffer(1, capacity, values)
            self.keys[..., :length, :], self.values[..., :length, :] = keys, values
            self.end, self.padding = length, [0]
            return
        if length > self.end:  # the batch is shorter: pad its rows on the left
            shift = length - self.end
            capacity = self._capacity(length + 1)
            old_k, old_v = self.keys[..., : self.end, :], self.values[..., : self.end, :]
            self.keys = self._buffer(old_k.shape[0], capacity, old_k)
            self.values = self._buffer(old_v.shape[0], capacity, old_v)
            self.keys[..., shift:length, :], self.values[..., shift:length, :] = old_k, old_v
            self.end, self.padding = length, [p + shift for p in self.padding]
        row_k = self._buffer(1, self.keys.shape[2], keys)
        row_v = self._buffer(1, self.keys.shape[2], values)
        row_k[..., self.end - length : self.end, :], row_v[..., self.end - length : self.end, :] = keys, values
        self.keys = torch.cat([self.keys, row_k], dim=0)
        self.values = torch.cat([self.values, row_v], dim=0)
        self.padding.append(self.end - length)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); drop the padding every remaining row has."""
        if not rows:
            self.keys, self.values, self.end, self.padding = None, None, 0, []
            return
        if rows != list(range(len(self.padding))):
            index = torch.tensor(rows, device=self.keys.device)
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
            self.padding = [self.padding[i] for i in rows]
        common = min(self.padding)
        if common:
            self.keys, self.values = self.keys[..., common:, :], self.values[..., common:, :]
            self.end, self.padding = self.end - common, [p - common for p in self.padding]

    @property
    def state(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.keys is None:
            return None, None
        return self.keys[..., : self.end, :], self.values[..., : self.end, :]


class FixedShapeView:
    """One layer's preallocated buffers seen at a position held on the device (for CUDA graphs).

    Writes go to ``offset`` with ``index_copy_`` and reads return the whole buffer with a mask of the
    visible keys, so a decode step has the same shapes and reads no host value at every position.
    """

    def __init__(self, cache: KVCache, position: torch.Tensor):
        if cache.keys is None:
            raise ValueError("a fixed-shape view needs a cache whose buffers are allocated (run the prefill first)")
        self.cache = cache
        self.offset = position  # (1,) int64, shared by all layers

    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``keys``/``values`` at ``offset`` and return the whole buffers."""
        positions = self.offset + torch.arange(keys.shape[2], device=keys.device)
        self.cache.keys.index_copy_(2, positions, keys)
        self.cache.values.index_copy_(2, positions, values)
        return self.cache.keys, self.cache.values

    def attention_mask(self, length: int) -> torch.Tensor:
        """``(length, T)`` booleans: query ``i`` sees the keys at positions up to ``offset + i``."""
        device = self.offset.device
        visible = self.offset + torch.arange(length, device=device)
        return torch.arange(self.cache.keys.shape[2], device=device)[None, :] <= visible[:, None]


def make_cache(num_layers: int, max_length: int | None = None) -> list[KVCache]:
    return [KVCache(max_length) for _ in range(num_layers)]


def make_batch_cache(num_layers: int) -> list[BatchKVCache]:
    return [BatchKVCache() for _ in range(num_layers)]
