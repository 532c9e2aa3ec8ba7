"""Character-level data from the bundled tiny Shakespeare text.

Every distinct character of the file is a token (65 of them); the first 90% of the text is the
training split and the last 10% the validation split. Batches are random windows of the split,
drawn with a ``torch.Generator`` so that a seeded generator gives the same batches every run.

    >>> data = load()
    >>> data.vocab_size, data.decode(data.encode("To be"))
    (65, 'To be')
    >>> x, y = data.get_batch("train", 4, 8, torch.Generator().manual_seed(0))
    >>> x.shape, x.dtype, bool((x[:, 1:] == y[:, :-1]).all())  # y is x shifted by one token
    (torch.Size([4, 8]), torch.int64, True)
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"


class CharData:
    """A text as token ids, its character vocabulary, and its train/val splits.

    Args:
        text: the whole corpus. train_fraction: the share of it (from the start) used for
            training; the rest is validation.

    Raises:
        ValueError: a text too short to split, or a fraction outside (0, 1).
    """

    def __init__(self, text: str, train_fraction: float = 0.9) -> None:
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction={train_fraction!r} must be in (0, 1)")
        if len(text) < 2:
            raise ValueError(f"the text has {len(text)} characters; it needs at least 2")
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        ids = self.encode(text)
        n = int(train_fraction * len(ids))
        self.splits = {"train": ids[:n], "val": ids[n:]}

    def encode(self, s: str) -> torch.Tensor:
        """Characters -> int64 token ids [len(s)]; raises KeyError on an unknown character."""
        return torch.tensor([self._stoi[c] for c in s], dtype=torch.int64)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows of ``split``; returns (x, y), both int64 [B, T].

        ``y`` is ``x`` shifted one token ahead: position t of ``x`` predicts position t of ``y``.
        The windows depend only on the generator's state, so a seeded generator replays them.

        Raises:
            ValueError: an unknown split, or a block longer than the split allows.
        """
        if split not in self.splits:
            raise ValueError(f"split={split!r} is unknown; use 'train' or 'val'")
        data = self.splits[split]
        if block_size + 1 > len(data):
            raise ValueError(f"block_size={block_size} needs {block_size + 1} tokens but the "
                             f"{split} split has {len(data)}")
        start = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        windows = data.unfold(0, block_size + 1, 1)[start]  # [B, T + 1], a copy (fancy index)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


@functools.cache
def load(path: str | Path = DEFAULT_PATH) -> CharData:
    """The corpus at ``path`` (default: the bundled tiny Shakespeare), read once per process."""
    return CharData(Path(path).read_text(encoding="utf-8"))


def get_batch(split: str, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`CharData.get_batch` on the bundled text."""
    return load().get_batch(split, batch_size, block_size, generator)
