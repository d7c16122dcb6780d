"""One-GPU check of scdlkit's CUDA paths: speed, memory and bf16 parity, in one table.

Run through ``benchmarks/gpu_check.sh`` (which checks for a GPU and caps the run at 8 minutes),
or directly: ``python benchmarks/gpu_check.py [--device cuda:0]``. ``--dry-run`` runs every step
with a tiny model on the CPU in seconds (the test suite does), so the script is known to work
before a GPU is at hand.

Rows (a whole-human-sized encoder with random weights: 12 layers, d=512, vocab 60,697; the speed
does not depend on the weight values):

- embedding in bf16 (``encode_cells``: length-grouped, pinned, non-blocking batches) on cells of
  exactly 1,200 tokens and on cells of realistic length (log-normal around 700 expressed genes),
  with the model FLOP utilisation (useful FLOPs, as in ``embed_throughput.py``, against the
  GPU's dense bf16 peak);
- fine-tuning: every weight (``full_finetune``) and ``lora``, bf16 autocast, AdamW, batches of
  similar length drawn as the Trainer draws them;
- the peak GPU memory of each row;
- bf16 against fp32 on the test fixture (``tests/data/scgpt-tiny-flash``) and on the realistic
  cells, and fp32 on the fixture against the reference embeddings of upstream scGPT.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "tests" / "data" / "scgpt-tiny-flash"
TINY = {"embsize": 32, "nheads": 4, "d_hid": 64, "nlayers": 2, "n_vocab_genes": 3000}
#: Dense bf16 peak TFLOP/s by device-name fragment (the MFU denominator).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
COLUMNS = ("check", "result", "goal", "peak GPU memory")


def _load(name: str) -> ModuleType:
    module_name = f"scdlkit_benchmarks_{name.lstrip('_')}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, when its name is known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def _median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels, allocator, the bf16 weight copy
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def embedding_row(
    label: str,
    model: Any,
    tokens: Any,
    *,
    device: torch.device,
    batch_size: int,
    repeats: int,
    goal: str,
) -> dict[str, str]:
    """bf16 embedding cells/s and model FLOP utilisation on ``tokens``."""
    bench = _load("embed_throughput")
    _reset_peak(device)

    def run() -> np.ndarray:
        return bench.encode_tokens(model, tokens, device, batch_size, "bf16")

    seconds = _median_seconds(run, device, repeats)
    achieved = bench.useful_flops(model.args, tokens.lengths) / seconds / 1e12
    peak = peak_tflops(device)
    mfu = f"MFU {100 * achieved / peak:.1f}% of {peak:g}" if peak else "MFU n/a (peak unknown)"
    return {
        "check": f"{label} (median {int(np.median(tokens.lengths))} tokens, batch {batch_size})",
        "result": f"{tokens.n_cells / seconds:,.0f} cells/s; {achieved:.3g} TFLOP/s, {mfu}",
        "goal": goal,
        "peak GPU memory": _peak(device),
    }


def training_row(
    strategy: str,
    encoder_state: dict[str, torch.Tensor],
    args: Any,
    n_tokens: int,
    pad_id: int,
    tokens: Any,
    *,
    device: torch.device,
    batch_size: int,
    steps: int,
    goal: str,
) -> dict[str, str]:
    """Training cells/s of ``strategy`` (forward, backward, AdamW step) in bf16 autocast."""
    from scdlkit.foundation._annotation_model import ScGPTAnnotationModel
    from scdlkit.foundation._batching import length_grouped_batches
    from scdlkit.foundation.models.scgpt._model import ScGPTEncoder
    from scdlkit.foundation.models.scgpt._tokenize import collate_tokens

    _reset_peak(device)
    encoder = ScGPTEncoder(args, n_tokens=n_tokens, pad_id=pad_id)
    encoder.load_state_dict(encoder_state)
    model = ScGPTAnnotationModel(encoder, 10, tuning_strategy=strategy).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-4)
    rng = np.random.default_rng(0)
    batches = list(length_grouped_batches(tokens.lengths, batch_size, shuffle=True, seed=0))
    batches = [b for b in batches if len(b) == batch_size] or batches
    model.train()
    cells, times = 0, []
    for step in range(steps + 1):  # step 0 warms up kernels and the allocator
        positions = batches[step % len(batches)]
        batch = collate_tokens(tokens, positions)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = torch.as_tensor(rng.integers(0, 10, len(positions)), device=device)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(batch)["logits"]
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        _sync(device)
        if step:
            times.append(time.perf_counter() - start)
            cells += len(positions)
    rate = cells / sum(times)
    trainable = sum(p.numel() for p in params)
    return {
        "check": f"{strategy} training, bf16 (batch {batch_size}, {trainable:,} trainable)",
        "result": f"{rate:,.1f} cells/s",
        "goal": goal,
        "peak GPU memory": _peak(device),
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def parity_rows(
    model: Any, tokens: Any, *, device: torch.device, batch_size: int
) -> list[dict[str, str]]:
    """bf16 against fp32 (fixture and realistic cells), fp32 against upstream on the fixture."""
    import anndata as ad

    import scdlkit as sck

    _reset_peak(device)
    adata = ad.read_h5ad(FIXTURE / "data.h5ad")
    expected = np.load(FIXTURE / "expected.npz")["cls_embedding"]
    common = {"checkpoint": FIXTURE / "checkpoint", "device": str(device), "progress": False}
    fp32 = sck.tl.embed(adata, precision="fp32", copy=True, **common).obsm["X_scgpt"]
    bf16 = sck.tl.embed(adata, precision="bf16", copy=True, **common).obsm["X_scgpt"]
    rows = [
        {
            "check": "fixture: fp32 against upstream scGPT's embeddings",
            "result": f"max abs difference {np.abs(fp32 - expected).max():.2e}",
            "goal": "< 1e-4",
            "peak GPU memory": _peak(device),
        },
        {
            "check": "fixture: bf16 against fp32",
            "result": f"min cosine {_cosine(bf16, fp32).min():.6f}",
            "goal": "> 0.9999",
            "peak GPU memory": _peak(device),
        },
    ]
    bench = _load("embed_throughput")
    big = {p: bench.encode_tokens(model, tokens, device, batch_size, p) for p in ("fp32", "bf16")}
    rows.append(
        {
            "check": f"{model.args.nlayers}-layer model, {tokens.n_cells} realistic cells: bf16 "
            "against fp32",
            "result": f"min cosine {_cosine(big['bf16'], big['fp32']).min():.6f}",
            "goal": "> 0.9999",
            "peak GPU memory": _peak(device),
        }
    )
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="the GPU to check (default cuda)")
    p.add_argument("--cells", type=int, default=None, help="cells per embedding timing (8192)")
    p.add_argument("--batch-size", type=int, default=None, help="cells per embedding batch (64)")
    p.add_argument("--train-batch-size", type=int, default=None, help="cells per step (32)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (20)")
    p.add_argument("--repeats", type=int, default=None, help="embedding timings, median (3)")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, in seconds")
    args = p.parse_args(argv)
    defaults = {
        "device": "cuda",
        "cells": 8192,
        "batch_size": 64,
        "train_batch_size": 32,
        "steps": 20,
        "repeats": 3,
    }
    if args.dry_run:
        defaults |= {"device": "cpu", "cells": 24, "batch_size": 8, "train_batch_size": 4}
        defaults |= {"steps": 2, "repeats": 1}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run every check, print the table and return it."""
    from scdlkit.foundation import load_scgpt_model, resolve_checkpoint, tokenize_adata

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        msg = f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU."
        raise SystemExit(msg)
    syn = _load("_synthetic")
    arch = TINY if args.dry_run else syn.WHOLE_HUMAN
    max_len = 128 if args.dry_run else 1200
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scdlkit-gpu-check-") as tmp:
        folder = syn.write_random_checkpoint(Path(tmp) / "ckpt", max_seq_len=max_len, **arch)
        ckpt = resolve_checkpoint(folder)
        vocab_genes = syn.fake_gene_symbols(arch["n_vocab_genes"])
        n_genes = 2000 if args.dry_run else 20_000  # a dataset's genes: part of the vocabulary
        picked = np.random.default_rng(0).choice(len(vocab_genes), n_genes, replace=False)
        genes = [vocab_genes[i] for i in np.sort(picked)]
        full = syn.synthetic_adata(
            args.cells, genes, min_expressed=max_len - 1, max_expressed=max_len - 1, seed=1
        )
        realistic = syn.synthetic_adata(
            args.cells,
            genes,
            min_expressed=20 if args.dry_run else 200,
            max_expressed=max_len if args.dry_run else 2000,
            median_expressed=max_len / 2 if args.dry_run else 700,
            seed=2,
        )
        full_tokens, _ = tokenize_adata(full, ckpt, seed=0)
        real_tokens, _ = tokenize_adata(realistic, ckpt, seed=0)
        model = load_scgpt_model(ckpt, device=device)
        rows = [
            embedding_row(
                f"embedding, bf16, {max_len:,} tokens/cell",
                model,
                full_tokens,
                device=device,
                batch_size=args.batch_size,
                repeats=args.repeats,
                goal=">= 3,000 cells/s (H100/H200)",
            ),
            embedding_row(
                "embedding, bf16, realistic lengths",
                model,
                real_tokens,
                device=device,
                batch_size=args.batch_size,
                repeats=args.repeats,
                goal="",
            ),
        ]
        rows += parity_rows(model, real_tokens, device=device, batch_size=args.batch_size)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        model_args, n_tokens, pad_id = model.args, len(ckpt.vocab), model.pad_id
        del model
        for strategy, goal in (("full_finetune", ">= 600 cells/s (upstream ~150)"), ("lora", "")):
            rows.append(
                training_row(
                    strategy,
                    state,
                    model_args,
                    n_tokens,
                    pad_id,
                    real_tokens,
                    device=device,
                    batch_size=args.train_batch_size,
                    steps=args.steps,
                    goal=goal,
                )
            )
    bench = _load("embed_throughput")
    where = bench.machine_name(device)
    kind = "dry run: tiny model on the CPU; " if args.dry_run else ""
    header = (
        f"{kind}{where}; torch {torch.__version__}; "
        f"{arch['nlayers']} layers, d={arch['embsize']}; {time.perf_counter() - started:.0f} s"
    )
    text = "\n".join([header, "", bench.markdown_table(COLUMNS, rows)])
    print(text)
    return text


if __name__ == "__main__":
    main()
