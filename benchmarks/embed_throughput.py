"""Throughput of ``sck.tl.embed`` against scGPT run "the upstream way", on this machine.

Both paths run the same whole-human-sized encoder (random weights: 12 layers, d=512, vocab
60,697) on the same synthetic cells, whose numbers of expressed genes are realistic (log-normal,
a few hundred to two thousand). Both include reading the checkpoint and tokenising, so the ratio
is end to end:

- ``sck.tl.embed``: the package as a user calls it (length-grouped batches, default precision:
  bf16 autocast where the hardware has native bf16 (CUDA, AMX/AVX512-BF16 CPUs), else fp32);
- "upstream way", as in upstream ``embed_data``: the same tokens, cells in input order, consecutive
  batches of ``--batch-size`` padded to the batch's longest cell, fp32, no length grouping.

Also reported: tokenisation cells/s and the bytes of stored tokens per non-zero gene. On CUDA
(or with ``--mfu``) a second table gives cells/s at 1,200 tokens per cell in bf16 and the model
FLOP utilisation, with FLOPs counted analytically (``2 * matmul params * tokens`` plus
``4 * L^2 * d`` per layer for attention) against 989 TFLOP/s (H100 SXM, bf16 dense).

Run ``python benchmarks/embed_throughput.py`` (about 5 minutes on 2 otherwise idle CPU cores;
other programs on the cores slow the wall clock, so CPU-time speed-up is reported too), or
``--quick`` for a seconds-long smoke run with a tiny model.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import scdlkit as sck
from scdlkit._shared.hardware import native_bf16
from scdlkit.foundation import load_scgpt_model, resolve_checkpoint, tokenize_adata
from scdlkit.foundation._device import resolve_device, resolve_precision
from scdlkit.foundation._embed import encode_cells, inference_batches, l2_normalise, padded_width
from scdlkit.foundation.models.scgpt._tokenize import collate_tokens


def _load_synthetic() -> Any:
    name = "scdlkit_benchmarks_synthetic"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_synthetic.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


syn = _load_synthetic()

#: H100 SXM dense bf16 peak, the denominator of the reported model FLOP utilisation.
H100_BF16_PEAK_TFLOPS = 989.0

COLUMNS = (
    "machine",
    "cores / torch threads",
    "torch",
    "device",
    "model",
    "cells",
    "tokens/cell (median)",
    "sck.tl.embed cells/s",
    "upstream way cells/s",
    "speed-up",
    "speed-up (CPU time)",
    "agreement (min cosine)",
    "tokenise cells/s",
    "token bytes / non-zero",
)
PRECISION_COLUMNS = (
    "precision",
    "cells/s",
    "useful GFLOP/s",
    "GEMM GFLOP/s",
    "fraction of GEMM",
    "attention share of FLOPs",
    "attention kernel alone, fraction of GEMM",
    "ceiling set by attention",
    "min cosine to fp32",
)
#: torch.profiler operator names (substrings) -> the kind of work, for ``--profile``.
OP_GROUPS = {
    "matrix products (linear layers)": (
        "aten::addmm",
        "aten::mm",
        "aten::bmm",
        "aten::matmul",
        "aten::linear",
        "mkldnn::_linear_pointwise",
    ),
    "attention (SDPA)": ("scaled_dot_product", "flash_attention", "efficient_attention"),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone"),
    "layer norm": ("layer_norm",),
    "elementwise (add, ReLU, clamp)": ("aten::add", "aten::clamp", "aten::relu", "aten::mul"),
}
MFU_COLUMNS = (
    "device",
    "precision",
    "tokens/cell",
    "batch",
    "cells/s",
    "GFLOP/cell",
    "achieved TFLOP/s",
    "MFU",
)

TINY = {
    "embsize": 32,
    "nheads": 4,
    "d_hid": 64,
    "nlayers": 2,
    "n_vocab_genes": 3000,
    "max_seq_len": 128,
}


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else whatever ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} + {cpu_model()}"
    return cpu_model()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall-clock seconds of ``fn()`` and its result."""
    seconds, _, result = timed_cpu(fn, device)
    return seconds, result


def timed_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """Wall-clock and process CPU seconds of ``fn()``, and its result.

    CPU seconds hardly move when other programs share the cores; wall-clock seconds do.
    """
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu, result


def embed_upstream_way(
    adata: Any, checkpoint: Path, *, batch_size: int, device: torch.device
) -> np.ndarray:
    """Cell embeddings computed as upstream ``embed_data`` does, with our encoder and tokens.

    Cells in input order, consecutive batches padded to their longest cell, fp32 (no autocast).
    Reads the checkpoint and tokenises, as ``sck.tl.embed`` does, so the two time the same work.
    """
    ckpt = resolve_checkpoint(checkpoint)
    tokens, _ = tokenize_adata(adata, ckpt, seed=0)
    model = load_scgpt_model(ckpt, device=device)
    out = []
    with torch.inference_mode():
        for start in range(0, tokens.n_cells, batch_size):
            batch = collate_tokens(tokens, range(start, min(start + batch_size, tokens.n_cells)))
            batch = {k: v.to(device) for k, v in batch.items()}
            cls = model.cls_embedding(batch["gene_ids"], batch["values"], batch["padding_mask"])
            out.append(cls.float().cpu().numpy())
    return l2_normalise(np.concatenate(out))


def embed_ours(
    adata: Any, checkpoint: Path, *, batch_size: int, device: torch.device
) -> np.ndarray:
    sck.tl.embed(
        adata, checkpoint=checkpoint, batch_size=batch_size, device=str(device), progress=False
    )
    return adata.obsm["X_scgpt"]


def useful_flops(args: Any, lengths: Sequence[int] | np.ndarray) -> float:
    """FLOPs the ``<cls>`` embeddings of cells of ``lengths`` tokens need (no padding counted).

    Every layer but the last, over all positions: ``2 (4 d^2 + 2 d h)`` per token for the
    projections and the feed-forward, ``4 L^2 d`` for attention scores and values. The last
    layer: keys and values of every position, then the query, attention, output projection and
    feed-forward of ``<cls>`` alone. The value encoder's ``d x d`` layer on every token.
    """
    d, h, n = args.embsize, args.d_hid, args.nlayers
    length = np.asarray(lengths, dtype=np.float64)
    layer = 2.0 * (4 * d * d + 2 * d * h) * length + 4.0 * length**2 * d
    last = 4.0 * d * d * length + 2.0 * (2 * d * d + 2 * d * h) + 4.0 * length * d
    value_encoder = 2.0 * (d + d * d) * length
    return float((value_encoder + (n - 1) * layer + last).sum())


def gemm_rate(
    dtype: torch.dtype, rows: int, device: torch.device, *, d: int = 512, repeats: int = 5
) -> float:
    """GFLOP/s of ``(rows x d) @ (d x 3d)``: the attention input projection's shape."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=gen).to(device, dtype)
    w = torch.randn(3 * d, d, generator=gen).to(device, dtype)
    with torch.inference_mode():
        x @ w.t()  # warm-up
        seconds = statistics.median(timed(lambda: x @ w.t(), device)[0] for _ in range(repeats))
    return 2.0 * rows * d * 3 * d / seconds / 1e9


def attention_flops(args: Any, lengths: Sequence[int]) -> float:
    """The attention (scores and values) part of :func:`useful_flops`."""
    length = np.asarray(lengths, dtype=np.float64)
    d, n = args.embsize, args.nlayers
    return float(((n - 1) * 4.0 * length**2 * d + 4.0 * length * d).sum())


def attention_rate(
    dtype: torch.dtype, lengths: np.ndarray, batch_size: int, device: torch.device, args: Any
) -> float:
    """GFLOP/s of torch's attention kernel alone (``scaled_dot_product_attention`` with a padding
    mask) at the median inference batch's shape: the ceiling attention puts on the encoder."""
    batches = sorted(inference_batches(lengths, batch_size), key=len)
    cells = batches[len(batches) // 2]
    batch, width = len(cells), padded_width(int(lengths[cells].max()))
    heads, d = args.nheads, args.embsize
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, width, d // heads, generator=gen).to(device, dtype)
        for _ in range(3)
    )
    keep = torch.arange(width)[None, :] < torch.as_tensor(lengths[cells])[:, None]
    mask = keep[:, None, None, :].to(device)

    def run() -> Any:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with torch.inference_mode():
        run()
        seconds = statistics.median(timed(run, device)[0] for _ in range(5))
    real = float((np.asarray(lengths[cells], dtype=np.float64) ** 2).sum())
    return 4.0 * real * d / seconds / 1e9


def batch_rows(lengths: np.ndarray, batch_size: int) -> int:
    """Median padded tokens per inference batch: the rows of its matrix products."""
    rows = [
        len(p) * padded_width(int(lengths[p].max())) for p in inference_batches(lengths, batch_size)
    ]
    return int(np.median(rows))


@contextlib.contextmanager
def plain_autocast() -> Iterator[None]:
    """bf16 as scdlkit ran it before its bf16 weight copy: autocast on the fp32 weights and
    batches padded to their longest cell only (batch sizes stay powers of two)."""
    from scdlkit.foundation import _embed
    from scdlkit.foundation.models.scgpt import _model

    saved = _model._bf16_inference, _embed.WIDTH_MULTIPLE
    _model._bf16_inference, _embed.WIDTH_MULTIPLE = (lambda *_: False), 1
    try:
        yield
    finally:
        _model._bf16_inference, _embed.WIDTH_MULTIPLE = saved


def _variants(autocast_baseline: bool) -> list[tuple[str, str, Callable[[], Any]]]:
    variants = [("fp32", "fp32", contextlib.nullcontext), ("bf16", "bf16", contextlib.nullcontext)]
    if autocast_baseline:
        variants.append(("bf16, plain autocast (before)", "bf16", plain_autocast))
    return variants


def encode_tokens(
    model: Any, tokens: Any, device: torch.device, batch_size: int, precision: str
) -> np.ndarray:
    """``<cls>`` outputs of every cell through ``encode_cells``, as ``sck.tl.embed`` runs it."""
    return encode_cells(
        tokens,
        lambda b: model.cls_embedding(b["gene_ids"], b["values"], b["padding_mask"]),
        device=device,
        batch_size=batch_size,
        precision=precision,
    )


def precision_rows(
    model: Any,
    tokens: Any,
    *,
    device: torch.device,
    batch_size: int,
    repeats: int,
    autocast_baseline: bool = False,
) -> list[dict[str, Any]]:
    """Cells/s and useful FLOP rate of the encoder per precision, beside a same-run GEMM rate.

    Each model run is timed between two runs of the reference product in the same dtype, so
    load from other programs slows both alike; medians over ``repeats``.
    """
    useful = useful_flops(model.args, tokens.lengths)
    attention_share = attention_flops(model.args, tokens.lengths) / useful
    rows, d = batch_rows(tokens.lengths, batch_size), model.args.embsize
    variants = _variants(autocast_baseline)
    outputs = {}
    for name, precision, context in variants:  # warm-up, and the results compared with fp32
        with context():
            embeddings = encode_tokens(model, tokens, device, batch_size, precision)
            outputs[name] = l2_normalise(embeddings)
    seconds: dict[str, list[float]] = {name: [] for name, *_ in variants}
    gemms: dict[str, list[float]] = {name: [] for name, *_ in variants}
    fractions: dict[str, list[float]] = {name: [] for name, *_ in variants}
    for _ in range(repeats):
        for name, precision, context in variants:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            before = gemm_rate(dtype, rows, device, d=d)
            with context():
                elapsed, _ = timed(
                    lambda p=precision: encode_tokens(model, tokens, device, batch_size, p), device
                )
            gemm = (before + gemm_rate(dtype, rows, device, d=d)) / 2
            seconds[name].append(elapsed)
            gemms[name].append(gemm)
            fractions[name].append(useful / elapsed / 1e9 / gemm)
    out = []
    for name, precision, _ in variants:
        elapsed = statistics.median(seconds[name])
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        attention = attention_rate(dtype, tokens.lengths, batch_size, device, model.args)
        attention_fraction = attention / statistics.median(gemms[name])
        # reachable if all but attention ran at the GEMM rate and attention at its kernel's
        ceiling = 1.0 / (1.0 - attention_share + attention_share / attention_fraction)
        out.append(
            {
                "precision": name,
                "cells/s": f"{tokens.n_cells / elapsed:.2f}",
                "useful GFLOP/s": f"{useful / elapsed / 1e9:.1f}",
                "GEMM GFLOP/s": f"{statistics.median(gemms[name]):.1f}",
                "fraction of GEMM": f"{statistics.median(fractions[name]):.2f}",
                "attention share of FLOPs": f"{attention_share:.2f}",
                # 3 significant digits: with AMX bf16 GEMMs the kernel can be under 1% of them
                "attention kernel alone, fraction of GEMM": f"{attention_fraction:.3g}",
                "ceiling set by attention": f"{ceiling:.2f}",
                "min cosine to fp32": f"{(outputs[name] * outputs['fp32']).sum(1).min():.6f}",
            }
        )
    return out


OTHER_OPS = "other (embedding, masks, allocation, ...)"


def _op_group(name: str) -> str:
    """The group of a profiler op: exact ``aten::`` names, substrings for the rest."""
    for group, keys in OP_GROUPS.items():
        if any(name == key or ("::" not in key and key in name) for key in keys):
            return group
    return OTHER_OPS


def profile_table(
    model: Any,
    tokens: Any,
    *,
    device: torch.device,
    batch_size: int,
    autocast_baseline: bool = False,
) -> str:
    """Where the encoder's time goes per precision: torch.profiler self time by kind of op."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    groups = [*OP_GROUPS, OTHER_OPS]
    columns = ["op group"]
    rows: dict[str, dict[str, str]] = {g: {"op group": g} for g in [*groups, "total"]}
    for name, precision, context in _variants(autocast_baseline):
        with context():
            encode_tokens(model, tokens, device, batch_size, precision)  # warm-up
            with profile(activities=activities) as prof:
                encode_tokens(model, tokens, device, batch_size, precision)
        spent = dict.fromkeys(groups, 0.0)
        for event in prof.key_averages():
            self_time = event.self_cpu_time_total
            if device.type == "cuda":
                self_time = getattr(event, "self_device_time_total", self_time)
            spent[_op_group(event.key)] += self_time / 1e3
        total = sum(spent.values()) or 1.0
        columns += [f"{name} ms", f"{name} %"]
        for group in groups:
            rows[group][f"{name} ms"] = f"{spent[group]:,.1f}"
            rows[group][f"{name} %"] = f"{100 * spent[group] / total:.1f}"
        rows["total"][f"{name} ms"], rows["total"][f"{name} %"] = f"{total:,.1f}", "100"
    return markdown_table(columns, list(rows.values()))


def fixed_length_throughput(
    checkpoint: Path,
    genes: Sequence[str],
    *,
    device: torch.device,
    n_cells: int,
    batch_size: int,
    repeats: int,
    precision: str = "bf16",
) -> dict[str, Any]:
    """Cells/s and FLOP rate of ``encode_cells`` on cells of exactly ``max_seq_len`` tokens."""
    ckpt = resolve_checkpoint(checkpoint)
    length = ckpt.args.max_seq_len
    known = [g for g in genes if g in ckpt.vocab]  # every expressed gene must become a token
    adata = syn.synthetic_adata(
        n_cells, known, min_expressed=length - 1, max_expressed=length - 1, seed=1
    )
    tokens, _ = tokenize_adata(adata, ckpt, seed=0)
    assert (tokens.lengths == length).all(), "fixed-length cells did not tokenise to max_seq_len"
    model = load_scgpt_model(ckpt, device=device)

    def run() -> np.ndarray:
        return encode_tokens(model, tokens, device, batch_size, precision)

    run()  # warm-up: kernels, allocator
    seconds = statistics.median(timed(run, device)[0] for _ in range(repeats))
    cells_per_s = n_cells / seconds
    flops = useful_flops(model.args, [length])
    achieved = cells_per_s * flops / 1e12
    mfu = (
        f"{100 * achieved / H100_BF16_PEAK_TFLOPS:.1f}% of {H100_BF16_PEAK_TFLOPS:g}"
        if device.type == "cuda"
        else "n/a (no GPU peak)"
    )
    return {
        "device": machine_name(device),
        "precision": precision,
        "tokens/cell": length,
        "batch": batch_size,
        "cells/s": f"{cells_per_s:,.1f}",
        "GFLOP/cell": f"{flops / 1e9:.1f}",
        "achieved TFLOP/s": f"{achieved:.3g}",
        "MFU": mfu,
    }


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--n-cells", type=int, default=None, help="cells embedded per repeat (96; 8192 on CUDA)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--batch-size", type=int, default=64, help="cells per batch, both paths")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument(
        "--tokenize-cells", type=int, default=2000, help="cells in the tokenisation timing"
    )
    p.add_argument(
        "--mfu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fixed-length bf16 FLOP-utilisation table (default: only on CUDA)",
    )
    p.add_argument("--mfu-cells", type=int, default=4096, help="cells in the MFU timing")
    p.add_argument(
        "--precision-cells",
        type=int,
        default=32,
        help="cells (150 to 1,100 expressed genes) in the per-precision table",
    )
    p.add_argument(
        "--autocast-baseline",
        action="store_true",
        help="add bf16 as it ran before the bf16 weight copy (plain autocast) to the tables",
    )
    p.add_argument("--profile", action="store_true", help="where the encoder's time goes")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--quick", action="store_true", help="tiny model and data: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.n_cells, args.repeats, args.tokenize_cells = 16, 1, 32
        args.batch_size, args.mfu_cells, args.precision_cells = 8, 8, 8
    return args


def bf16_hardware(device: torch.device) -> str:
    """Whether ``device`` runs bf16 natively, and from which CPU flags."""
    if device.type == "cpu":
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            flags = set()
        found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
        if native_bf16(device):
            return f"yes ({', '.join(found) or 'SCDLKIT_NATIVE_BF16=1'})"
        return "no (bf16 is emulated: its figures do not show what native bf16 would do)"
    return "yes" if native_bf16(device) else "no"


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark, print the markdown table(s) and return them."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.n_cells is None:
        args.n_cells = 8192 if device.type == "cuda" else 96
    arch = TINY if args.quick else syn.WHOLE_HUMAN
    n_data_genes = 2000 if args.quick else 20000
    # quick: some cells above max_seq_len (128), so the subsampling path runs too
    expressed = {"min_expressed": 20, "max_expressed": 200} if args.quick else {}

    with tempfile.TemporaryDirectory(prefix="scdlkit-bench-") as tmp:
        folder = syn.write_random_checkpoint(Path(tmp) / "scgpt-random", **arch)
        # a dataset's genes: a random subset of the vocabulary plus 5% the vocabulary lacks
        rng = np.random.default_rng(0)
        vocab_genes = np.array(syn.fake_gene_symbols(arch["n_vocab_genes"]))
        genes = [
            *vocab_genes[np.sort(rng.choice(len(vocab_genes), n_data_genes, replace=False))],
            *(f"NOTINVOCAB{i}" for i in range(n_data_genes // 20)),
        ]
        adata = syn.synthetic_adata(args.n_cells, genes, seed=0, **expressed)
        ckpt = resolve_checkpoint(folder)

        # tokenisation alone, on a larger dataset so the timing is not noise
        tok_adata = syn.synthetic_adata(args.tokenize_cells, genes, seed=2, **expressed)
        tok_seconds = statistics.median(
            timed(lambda: tokenize_adata(tok_adata, ckpt), device)[0] for _ in range(args.repeats)
        )
        tokens, _ = tokenize_adata(adata, ckpt)

        warm = adata[: min(8, adata.n_obs)].copy()  # first-call costs stay out of the timings
        embed_ours(warm, folder, batch_size=args.batch_size, device=device)
        embed_upstream_way(warm, folder, batch_size=args.batch_size, device=device)

        ours_s, upstream_s, ours_cpu, upstream_cpu = [], [], [], []
        for _ in range(args.repeats):
            run_adata = adata.copy()
            seconds, cpu_seconds, ours = timed_cpu(
                lambda a=run_adata: embed_ours(
                    a, folder, batch_size=args.batch_size, device=device
                ),
                device,
            )
            ours_s.append(seconds)
            ours_cpu.append(cpu_seconds)
            seconds, cpu_seconds, theirs = timed_cpu(
                lambda: embed_upstream_way(
                    adata, folder, batch_size=args.batch_size, device=device
                ),
                device,
            )
            upstream_s.append(seconds)
            upstream_cpu.append(cpu_seconds)
        ours_rate = args.n_cells / statistics.median(ours_s)
        upstream_rate = args.n_cells / statistics.median(upstream_s)
        n_layers, d = arch["nlayers"], arch["embsize"]
        row = {
            "machine": machine_name(device),
            "cores / torch threads": f"{os.cpu_count()} / {torch.get_num_threads()}",
            "torch": torch.__version__,
            "device": str(device),
            "model": f"{n_layers} layers, d={d}, vocab {len(ckpt.vocab):,}",
            "cells": args.n_cells,
            "tokens/cell (median)": int(np.median(tokens.lengths)),
            "sck.tl.embed cells/s": f"{ours_rate:.2f}",
            "upstream way cells/s": f"{upstream_rate:.2f}",
            "speed-up": f"{ours_rate / upstream_rate:.2f}x",
            "speed-up (CPU time)": (
                f"{statistics.median(upstream_cpu) / statistics.median(ours_cpu):.2f}x"
            ),
            "agreement (min cosine)": f"{float((ours * theirs).sum(1).min()):.5f}",
            "tokenise cells/s": f"{args.tokenize_cells / tok_seconds:,.0f}",
            "token bytes / non-zero": f"{tokens.nbytes / max(len(tokens.gene_ids), 1):.2f}",
        }
        out = [markdown_table(COLUMNS, [row])]
        ours_precision = resolve_precision("auto", device)
        out.append(
            f"\nMedian of {args.repeats} repeat(s), end to end (checkpoint read + tokenise + "
            f"encode), batch size {args.batch_size}. sck.tl.embed: length-grouped batches, "
            f"{ours_precision}. Upstream way: input order, padded to the batch maximum, fp32. "
            "Speed-up (CPU time): the same ratio in process CPU seconds, steadier than the wall "
            "clock when other programs share the cores."
        )

        # the encoder alone, per precision, beside a same-run GEMM rate (the issue-18 setting)
        lo, hi = (20, 120) if args.quick else (150, 1100)
        few = syn.synthetic_adata(
            args.precision_cells, genes, min_expressed=lo, max_expressed=hi, seed=3
        )
        few_tokens, _ = tokenize_adata(few, ckpt)
        model = load_scgpt_model(ckpt, device=device)
        rows = precision_rows(
            model,
            few_tokens,
            device=device,
            batch_size=args.batch_size,
            repeats=args.repeats,
            autocast_baseline=args.autocast_baseline,
        )
        out += ["", markdown_table(PRECISION_COLUMNS, rows)]
        out.append(
            f"\nThe encoder alone on {args.precision_cells} cells of {lo:,} to {hi:,} expressed "
            f"genes (median {int(np.median(few_tokens.lengths))} tokens), "
            f"{torch.get_num_threads()} torch thread(s); native bf16: {bf16_hardware(device)}. "
            "Useful FLOPs: what the <cls> embeddings need on real tokens (no padding, the last "
            "layer's <cls> position only). GEMM: (M x d) @ (d x 3d) in the row's dtype, "
            f"M = {batch_rows(few_tokens.lengths, args.batch_size):,} (median padded tokens per "
            f"batch), timed around every model run; medians of {args.repeats}. Attention kernel "
            "alone: torch's scaled_dot_product_attention with a padding mask at the median "
            "batch's shape, on real tokens' FLOPs. Ceiling: the fraction of GEMM the encoder "
            "would reach if everything but attention ran at the GEMM rate."
        )
        if args.profile:
            table = profile_table(
                model,
                few_tokens,
                device=device,
                batch_size=args.batch_size,
                autocast_baseline=args.autocast_baseline,
            )
            out += ["", table, "\ntorch.profiler self time of one run, grouped by kind of op."]
        del model

        if args.mfu if args.mfu is not None else device.type == "cuda":
            mfu_row = fixed_length_throughput(
                folder,
                genes,
                device=device,
                n_cells=args.mfu_cells,
                batch_size=args.batch_size,
                repeats=args.repeats,
            )
            out += ["", markdown_table(MFU_COLUMNS, [mfu_row])]
            out.append("\nFLOPs per cell: the useful FLOPs above, at max_seq_len tokens.")
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
