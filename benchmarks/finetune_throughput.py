"""Training throughput and saved size of each adaptation strategy at whole-human size.

A whole-human-sized scGPT (random weights: 12 layers, d=512, vocab 60,697) with a 10-class head.
For each trainable strategy: training cells/s (forward, backward, AdamW step; length-grouped
batches of cells with realistic expressed-gene counts), trainable parameters, and the bytes a saved
runner holds for it (``adaptation_state_dict`` as safetensors: only what the base checkpoint lacks).

Run: ``python benchmarks/finetune_throughput.py [--device cuda] [--steps 3] [--quick]
[--precision fp32|bf16] [--strategies full_finetune lora]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

STRATEGIES = ("head", "full_finetune", "lora", "adapter", "prefix_tuning", "ia3")
WHOLE_HUMAN = {"embsize": 512, "nheads": 8, "d_hid": 512, "nlayers": 12}
QUICK = {"embsize": 32, "nheads": 4, "d_hid": 64, "nlayers": 2}
VOCAB = 60_697


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def realistic_batch(
    n_cells: int, max_len: int, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """Tokens of cells expressing a few hundred to two thousand genes, capped at ``max_len``."""
    lengths = np.clip(rng.lognormal(np.log(700), 0.5, n_cells).astype(int), 200, 2000)
    lengths = np.minimum(lengths + 1, max_len)
    width = int(lengths.max())
    gene_ids = np.full((n_cells, width), VOCAB - 3, dtype=np.int64)  # <pad>
    values = np.full((n_cells, width), -2.0, dtype=np.float32)
    for row, n in enumerate(lengths):
        gene_ids[row, 0] = VOCAB - 2  # <cls>
        gene_ids[row, 1:n] = rng.choice(VOCAB - 3, n - 1, replace=False)
        values[row, 1:n] = rng.integers(1, 51, n - 1)
    ids = torch.from_numpy(gene_ids)
    return {
        "gene_ids": ids,
        "values": torch.from_numpy(values),
        "padding_mask": ids.eq(VOCAB - 3),
        "labels": torch.from_numpy(rng.integers(0, 10, n_cells)),
        "lengths": torch.from_numpy(lengths),
    }


def build(strategy: str, size: dict, device: torch.device):
    from scdlkit.foundation import ScGPTModelArgs
    from scdlkit.foundation._annotation_model import ScGPTAnnotationModel
    from scdlkit.foundation.models.scgpt._model import ScGPTEncoder, set_attention_dropout

    args = ScGPTModelArgs(**size)
    torch.manual_seed(0)
    encoder = ScGPTEncoder(args, n_tokens=VOCAB, pad_id=VOCAB - 3)
    model = ScGPTAnnotationModel(encoder, 10, tuning_strategy=strategy).to(device)
    if device.type == "cpu":
        set_attention_dropout(model, 0.0)  # no fused CPU kernel with attention dropout
    return model


def saved_bytes(model) -> int:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.adaptation_state_dict().items()}
    return len(save(state))


def train_rate(model, batches, device: torch.device, steps: int, *, use_bf16: bool) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for step in range(steps + 1):  # the first step warms up kernels and allocations
        batch = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(batch)["logits"]
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    return len(batches[0]["labels"]) / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per strategy (median)")
    parser.add_argument("--batch-size", type=int, default=None, help="cells per step")
    parser.add_argument("--max-len", type=int, default=1200, help="tokens per cell at most")
    parser.add_argument("--quick", action="store_true", help="tiny model (smoke run)")
    parser.add_argument(
        "--precision",
        choices=("default", "fp32", "bf16"),
        default="default",
        help="bf16 autocast or fp32; default: bf16 on CUDA, fp32 on a CPU",
    )
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    use_bf16 = args.precision == "bf16" or (args.precision == "default" and device.type == "cuda")
    size = QUICK if args.quick else WHOLE_HUMAN
    batch_size = args.batch_size or (32 if device.type == "cuda" else 4)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        batch = realistic_batch(batch_size, args.max_len, rng)
        batch.pop("lengths")
        batches.append(batch)
    mean_len = float((~batches[0]["padding_mask"]).sum(1).float().mean())
    print(f"machine: {machine(device)}")
    print(
        f"model: {size['nlayers']} layers, d={size['embsize']}, vocab {VOCAB:,}, 10 classes; "
        f"batch {batch_size} cells, ~{mean_len:.0f} tokens/cell (max {args.max_len}); "
        f"{'bf16 autocast' if use_bf16 else 'fp32'}; median of {args.steps} steps"
    )
    print("| strategy | train cells/s | trainable parameters | saved adaptation |")
    print("|---|---|---|---|")
    for strategy in args.strategies:
        model = build(strategy, size, device)
        rate = train_rate(model, batches, device, args.steps, use_bf16=use_bf16)
        size_mb = saved_bytes(model) / 2**20
        print(
            f"| {strategy} | {rate:.2f} | {model.trainable_parameter_count():,} | "
            f"{size_mb:.2f} MiB |"
        )
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
