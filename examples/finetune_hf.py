"""Fine-tune a Hugging Face causal LM with harmony, fully or with LoRA, on any text.

The model (nothing is downloaded):

* a preset name (``llama``, ``mistral``, ``qwen2``, ``opt``, ``gpt-neox``, ``gpt2``: a small
  model of that family, built from a config; GPT-2's LM head is tied to its token embedding);
* a ``config.json`` file, or a folder holding one: a new model of that architecture, any
  family harmony splits (docs/hf.md);
* a folder written by ``save_pretrained`` (config and weights): that model, trained on.

Text: the bundled Shakespeare (or ``--text FILE``), as the folder's tokenizer encodes it if it
has one, else as bytes (a vocabulary of 256). ``--lora R`` trains LoRA adapters of rank R on
every linear layer but the head (``peft``), the base frozen: harmony moves the frozen weights
as weights only. The device budget defaults to a third of the training state, so harmony swaps
packs of blocks every step. At the end it writes the loss curve (``--plot``) and, with
``--export``, a folder ``from_pretrained`` loads (the adapter alone with ``--lora``, which
``PeftModel.from_pretrained`` loads onto the base).

    python examples/finetune_hf.py                                   # a small Llama, ~1 min
    python examples/finetune_hf.py --model opt --steps 100 --plot opt-loss.png
    python examples/finetune_hf.py --model path/to/config.json --lora 8 --export adapter/
    python examples/finetune_hf.py --model path/to/saved-model --text notes.txt --device cuda \\
        --device-memory 8GiB
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: nothing is downloaded

import torch

try:
    import harmony
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import harmony

from swap.tier import fmt_bytes

TEXT = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"
SMALL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
         "num_attention_heads": 4, "vocab_size": 256, "max_position_embeddings": 256,
         "tie_word_embeddings": False, "use_cache": False}
PRESETS = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": 64}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "opt": ("OPTConfig", {"ffn_dim": 256, "word_embed_proj_dim": 128, "dropout": 0.0,
                          "num_attention_heads": 4}),
    "gpt-neox": ("GPTNeoXConfig", {}),
    "gpt2": ("GPT2Config", {"n_inner": 256, "tie_word_embeddings": True, "bos_token_id": 0,
                            "eos_token_id": 0}),
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        sys.exit("finetune_hf.py needs transformers: pip install 'harmony[hf]'")
    return transformers


def build(name: str) -> tuple[torch.nn.Module, Any]:
    """The model ``--model`` names, and its tokenizer (None: bytes)."""
    transformers = _transformers()
    path = Path(name)
    if name in PRESETS:
        cls_name, extra = PRESETS[name]
        kwargs = {**SMALL, **extra}
        if name == "opt":
            kwargs["ffn_dim"] = kwargs.pop("intermediate_size")
        config = getattr(transformers, cls_name)(**kwargs)
        return transformers.AutoModelForCausalLM.from_config(config), None
    if path.is_dir() and (path / "config.json").is_file():
        tokenizer = None
        if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        if weights:  # a saved model: train on from its weights
            return transformers.AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True), tokenizer
        path = path / "config.json"
    if path.is_file():
        data = json.loads(path.read_text())
        config = transformers.AutoConfig.for_model(**data)
        config.use_cache = False
        return transformers.AutoModelForCausalLM.from_config(config), None
    sys.exit(f"finetune_hf.py: --model {name!r} is neither a preset ({', '.join(PRESETS)}) "
             "nor a config.json file nor a folder holding one")


def with_lora(model: torch.nn.Module, r: int) -> torch.nn.Module:
    """``model`` with LoRA adapters of rank ``r`` on every linear layer but the head."""
    try:
        import peft
    except ImportError:
        sys.exit("--lora needs peft: pip install peft (or pip install 'harmony[hf]')")
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def tokens(text: Path, tokenizer: Any, vocab: int) -> torch.Tensor:
    """The text as token ids: the tokenizer's, or bytes."""
    if tokenizer is not None:
        return torch.tensor(tokenizer(text.read_text())["input_ids"], dtype=torch.long)
    if vocab < 256:
        sys.exit(f"finetune_hf.py: the model's vocabulary has {vocab} tokens and its folder no "
                 "tokenizer: the text as bytes needs 256; give a model with vocab_size >= 256")
    return torch.frombuffer(bytearray(text.read_bytes()), dtype=torch.uint8).long()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def plot(losses: list[float], path: str, title: str) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no loss curve (pip install matplotlib)")
        return
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    fig.savefig(path)
    print(f"loss curve written to {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama",
                   help=f"preset ({', '.join(PRESETS)}), config.json, or a model folder")
    p.add_argument("--text", type=Path, default=TEXT, help="text file to train on")
    p.add_argument("--lora", type=int, default=None, metavar="R",
                   help="train LoRA adapters of rank R (peft), the base frozen")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--device-memory", default=None, help="default: a third of the state")
    p.add_argument("--host-memory", default=None)
    p.add_argument("--nvme-dir", default=None)
    p.add_argument("--plot", default="finetune_hf_loss.png", help="loss-curve PNG ('' for none)")
    p.add_argument("--export", default=None, help="folder for from_pretrained-loadable weights")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit("finetune_hf.py: multi-GPU training lands in a later harmony version; "
                 "run with --nproc_per_node=1")
    if args.lora is not None and args.lora < 1:
        sys.exit(f"finetune_hf.py: --lora {args.lora} must be a positive rank")
    if not args.text.is_file():
        sys.exit(f"finetune_hf.py: --text {args.text} is not a file")
    torch.manual_seed(args.seed)
    model, tokenizer = build(args.model)
    vocab = model.get_input_embeddings().num_embeddings
    data = tokens(args.text, tokenizer, vocab)
    if len(data) < args.block_size + 2:
        sys.exit(f"finetune_hf.py: {args.text} has {len(data)} tokens, fewer than a block of "
                 f"{args.block_size}; give more text or a smaller --block-size")
    if args.lora is not None:
        model = with_lora(model, args.lora)
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    n_params = sum(q.numel() for q in model.parameters())
    # fp32 weights; gradients and AdamW's two moments for the trainable ones
    state = 4 * n_params + 12 * trainable
    budget = args.device_memory if args.device_memory is not None else state // 3
    g = torch.Generator().manual_seed(args.seed)
    shown = budget if isinstance(budget, str) else fmt_bytes(budget)
    lora = f" (LoRA r={args.lora}: {trainable / 1e6:.2f}M trainable)" if args.lora else ""
    print(f"{type(model).__name__}: {n_params / 1e6:.2f}M parameters{lora}, training state "
          f"{fmt_bytes(state)}, device budget {shown}")

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(data) - args.block_size - 1, (args.batch_size,),
                               generator=g).tolist()
        x = torch.stack([data[s:s + args.block_size] for s in starts])
        return x, torch.stack([data[s + 1:s + 1 + args.block_size] for s in starts])

    def trainer_for(limit: int | str) -> harmony.Trainer:
        return harmony.Trainer(model, loss_fn, optimizer=harmony.optim.adamw(lr=args.lr),
                               micro_batch_size=args.micro_batch_size, device=args.device,
                               device_memory=limit, host_memory=args.host_memory,
                               nvme_dir=args.nvme_dir, seed=args.seed)

    first = batch()
    trainer = trainer_for(budget)
    try:
        losses = [trainer.step(*first)]
    except harmony.InfeasiblePlan as err:
        trainer.close()
        if args.device_memory is not None:
            sys.exit(f"finetune_hf.py: {err}")
        # At this size activations outweigh a third of the state: take the least that works
        # (a refused plan changes nothing, so the same model starts again).
        print(f"a third of the training state is too small here; using the least device "
              f"memory any plan needs, {fmt_bytes(err.device_needed)}")
        trainer = trainer_for(err.device_needed)
        losses = [trainer.step(*first)]
    with trainer:
        t0 = time.perf_counter()
        for step in range(args.steps):
            if step:
                losses.append(trainer.step(*batch()))
            if step == 0 and trainer.plan is not None:
                print(trainer.plan.describe(trainer.chain.names))
            if step % 10 == 0 or step == args.steps - 1:
                print(f"step {step}: loss {losses[-1]:.4f}")
        seconds = time.perf_counter() - t0
        moved = {k: fmt_bytes(v / args.steps) for k, v in trainer.stats.bytes_moved.items()}
        print(f"{args.steps} steps in {seconds:.1f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
              f"bytes per step: {moved}")
        if args.export:
            what = "adapter" if args.lora else "weights"
            print(f"{what} written to {trainer.export(args.export)}")
    if args.plot:
        plot(losses, args.plot, f"{type(model).__name__} with harmony ({args.model}"
                                f"{f', LoRA r={args.lora}' if args.lora else ''})")


if __name__ == "__main__":
    main()
