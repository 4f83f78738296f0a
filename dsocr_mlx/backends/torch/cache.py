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

    def mask(self, length: int) -> torch.Tensor:
        """``(length, T)`` booleans: query ``i`` sees the keys at positions up to ``offset + i``."""
        device = self.offset.device
        visible = self.offset + torch.arange(length, device=device)
        return torch.arange(self.cache.keys.shape[2], device=device)[None, :] <= visible[:, None]


def make_cache(num_layers: int, max_length: int | None = None) -> list[KVCache]:
    return [KVCache(max_length) for _ in range(num_layers)]
