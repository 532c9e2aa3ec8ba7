"""Hugging Face models loaded for training without ever being whole in memory.

``from_pretrained(dir)`` builds the model and reads all of its weights into host memory. A
model larger than that is built here on the meta device instead (:func:`load_meta`: its
parameters without storage, its buffers real, from ``dir/config.json``), and the trainer reads
its weights from the directory's safetensors files (``model.safetensors``, or the shards
``model.safetensors.index.json`` names) one tensor at a time, straight into each pack's home
(:mod:`harmony.model.materialize`, :mod:`harmony.io.weights`)::

    model = harmony.load_meta("path/to/llama")          # nothing allocated
    trainer = harmony.Trainer(model, loss_fn, weights="path/to/llama", host_memory="8GiB",
                              nvme_dir="/mnt/nvme")
    # or in one call: harmony.Trainer.from_pretrained("path/to/llama", loss_fn, ...)

:meth:`harmony.Trainer.export` writes such a directory back (shards, index and
``config.json``). Only local directories are read: nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from harmony.model.materialize import empty_weights


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError("loading a Hugging Face model directory needs transformers: "
                          "pip install 'transformers>=4.56' (or harmony[hf])") from err
    return transformers


def load_meta(path: str | os.PathLike[str], model_class: Any = None,
              **config_overrides: Any) -> nn.Module:
    """The Hugging Face model of directory ``path`` (its ``config.json``), built with its
    parameters on the meta device and its buffers real, in training mode; give it to
    :class:`harmony.Trainer` with ``weights=path``.

    Args:
        path: a local directory as ``save_pretrained`` (or :meth:`harmony.Trainer.export`)
            writes it.
        model_class: the class to build (default: the first of ``config.architectures``, else
            ``AutoModelForCausalLM``).
        config_overrides: set on the config before building (e.g. ``use_cache=False``).

    Raises:
        FileNotFoundError: ``path`` has no ``config.json``.
        ValueError: the config names an architecture transformers does not have.
        ImportError: transformers is not installed.

    Example::

        model = harmony.load_meta("checkpoints/llama-3b")
        trainer = harmony.Trainer(model, loss_fn, weights="checkpoints/llama-3b", ...)
    """
    t = _transformers()
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; give a directory that "
                                "save_pretrained or harmony's Trainer.export wrote")
    config = t.AutoConfig.from_pretrained(folder, local_files_only=True)
    for k, v in config_overrides.items():
        setattr(config, k, v)
    cls = model_class
    if cls is None:
        names = list(getattr(config, "architectures", None) or [])
        if names and not hasattr(t, names[0]):
            raise ValueError(f"{folder}/config.json names architecture {names[0]!r}, which "
                             f"transformers {t.__version__} does not have; pass model_class=")
        cls = getattr(t, names[0]) if names else t.AutoModelForCausalLM
    with empty_weights():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    model.train()
    return model  # type: ignore[no-any-return]
