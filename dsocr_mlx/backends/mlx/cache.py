"""A small KV cache: preallocated in steps, with an offset that RoPE reads, in MLX."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one attention layer, ``(B, heads, T, head_dim)``, grown in ``step`` chunks."""

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append ``keys``/``values`` at ``offset`` and return everything cached so far."""
        prev, n = self.offset, keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            B, heads, _, dk = keys.shape
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, heads, grow, dk), keys.dtype)
            new_v = mx.zeros((B, heads, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset += n
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None]:
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
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.end = 0
        self.padding: list[int] = []

    @property
    def offset(self) -> mx.array:
        """``(B,)`` positions of each row's next token."""
        return mx.array([self.end - p for p in self.padding], dtype=mx.int32)

    def attention_mask(self, length: int) -> mx.array | None:
        """``(B, 1, 1, end + 1)`` booleans: row ``b`` sees its own keys, not its padding (one new position)."""
        if length != 1:
            raise ValueError("a batch decodes one position per row at a time; prefill each row alone")
        if not any(self.padding):
            return None
        columns = mx.arange(self.end + 1)[None, :]
        return (columns >= mx.array(self.padding)[:, None])[:, None, None, :]

    def _buffer(self, rows: int, capacity: int, like: mx.array) -> mx.array:
        return mx.zeros((rows, like.shape[1], capacity, like.shape[3]), like.dtype)

    def _capacity(self, needed: int) -> int:
        return ((needed + self.step - 1) // self.step) * self.step

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
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
        self.keys = mx.concatenate([self.keys, row_k], axis=0)
        self.values = mx.concatenate([self.values, row_v], axis=0)
        self.padding.append(self.end - length)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); drop the padding every remaining row has."""
        if not rows:
            self.keys, self.values, self.end, self.padding = None, None, 0, []
            return
        if rows != list(range(len(self.padding))):
            index = mx.array(rows)
            self.keys, self.values = self.keys[index], self.values[index]
            self.padding = [self.padding[i] for i in rows]
        common = min(self.padding)
        if common:
            self.keys, self.values = self.keys[..., common:, :], self.values[..., common:, :]
            self.end, self.padding = self.end - common, [p - common for p in self.padding]

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None]:
        if self.keys is None:
            return None, None
        return self.keys[..., : self.end, :], self.values[..., : self.end, :]


def make_cache(num_layers: int) -> list[KVCache]:
    return [KVCache() for _ in range(num_layers)]


def make_batch_cache(num_layers: int) -> list[BatchKVCache]:
    return [BatchKVCache() for _ in range(num_layers)]
