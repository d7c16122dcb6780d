#!/usr/bin/env python
"""Make the V1-style Geneformer parity fixture (tests/data/geneformer-tiny-v1) with official code.

The expected tokens and cell embeddings are produced by the OFFICIAL Geneformer code
(``geneformer/tokenizer.py``, ``emb_extractor.py``, ``perturber_utils.py`` of upstream commit
05fcbeb8a27d49e0a7a4349152202ee2c1cbfd28, read from the GitHub mirror
github:explorerwjy/Geneformer). That code is not part of this repository: export those files (and
``geneformer/__init__.py``) into ``SRC/geneformer/`` and pass ``SRC``. The real V1 dictionaries
(``*_gc30M.pkl``, byte-identical to the official Git LFS objects) are read from ``--real-dicts``
and restricted to a subset of genes.

Run it in an environment with the official requirements (transformers 4.46, datasets, scanpy,
anndata, loompy, peft, tdigest, seaborn, torch)::

    python tools/make_geneformer_v1_fixture.py SRC tests/data/geneformer-tiny-v1 --real-dicts DIR

What is changed in the official behaviour (everything is recorded in fixture.json):

1. The package ``__init__`` is not executed (it imports classifier/perturber/MTL modules that need
   ray, optuna, ...). A stand-in package module ``geneformer`` defines the eight dictionary path
   constants the official ``__init__`` defines; the ``*_30M`` ones point at the tiny dictionaries
   written here, the V2 ones at a path that does not exist. ``model_version="V1"`` makes the
   tokenizer and the embedding extractor read exactly these ``*_30M`` constants
   (``from . import TOKEN_DICTIONARY_FILE_30M``), overriding any path passed to them.
2. ``model_version="V1"`` forces ``model_input_size=2048``; the attribute is set to ``--max-input``
   after construction (``create_dataset`` reads ``self.model_input_size``).
3. ``get_embs``/``gen_attention_mask`` hard-code ``device="cuda"``: while the official
   ``extract_embs`` runs, ``torch.tensor(..., device="cuda")`` and ``Tensor.to("cuda")`` are mapped
   to the CPU. Nothing else is changed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import itertools
import json
import math
import pickle
import platform
import shutil
import sys
import tempfile
import types
from collections import Counter
from pathlib import Path

import numpy as np

OFFICIAL_COMMIT = "05fcbeb8a27d49e0a7a4349152202ee2c1cbfd28"
MIRROR = "github:explorerwjy/Geneformer"
OFFICIAL_FILES = ("__init__.py", "tokenizer.py", "emb_extractor.py", "perturber_utils.py")

# sha256 of the official V1 dictionaries = the oids of their Git LFS pointers at OFFICIAL_COMMIT
# (geneformer/gene_dictionaries_30m/*.pkl)
OFFICIAL_LFS_SHA256 = {
    "token_dictionary_gc30M.pkl": (
        "ab9dc40973fa5224d77b793e2fd114cacf3d08423ed9c4c49caf0ba9c7f218f1"
    ),
    "gene_median_dictionary_gc30M.pkl": (
        "b3b589bb5ec75040d05fc44dd6bf0184cf87f3c362cf158d196a6ed3b7fe5f39"
    ),
    "gene_name_id_dict_gc30M.pkl": (
        "55e67962e79c0039a6c32d43c5c99f38e51964bbcfa32f736150ee1e285c438c"
    ),
    "ensembl_mapping_dict_gc30M.pkl": (
        "eac0fb0b3007267871b6305ac0003ceba19d4f28d85686cb9067ecf142787869"
    ),
}
# pickle protocol of each official file (the mapping dict is protocol 5, the others 4)
PICKLE_PROTOCOL = {
    "token_dictionary_gc30M.pkl": 4,
    "gene_median_dictionary_gc30M.pkl": 4,
    "gene_name_id_dict_gc30M.pkl": 4,
    "ensembl_mapping_dict_gc30M.pkl": 5,
}
# the official Geneformer-V1-10M/config.json (the sizes scaled down here)
OFFICIAL_V1_CONFIG = {
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.02,
    "gradient_checkpointing": False,
    "hidden_act": "relu",
    "hidden_dropout_prob": 0.02,
    "hidden_size": 256,
    "initializer_range": 0.02,
    "intermediate_size": 512,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 2048,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 6,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "transformers_version": "4.6.0",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 25426,
}
TARGET_SUM = 10_000
PREFIX = "fixture"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# pickles written like the official ones (numpy scalars through numpy 1.x's global names)


def _numpy_scalar_reconstructor():
    return np.float64(0).__reduce__()[0]


class UpstreamPickler(pickle._Pickler):
    """Pure-Python pickler naming numpy's scalar reconstructor ``numpy.core.multiarray.scalar``.

    numpy 2 names it ``numpy._core.multiarray.scalar``; the official dictionaries were written with
    numpy 1.x. With this pickler the four real gc30M files re-pickle byte-identically (checked in
    ``check_pickler``).
    """

    _scalar = _numpy_scalar_reconstructor()

    def save_global(self, obj, name=None):
        if obj is self._scalar:
            if self.proto < 4:
                raise pickle.PicklingError("protocol >= 4 expected")
            self.save("numpy.core.multiarray")
            self.save("scalar")
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)


def upstream_dumps(obj, protocol: int) -> bytes:
    buf = io.BytesIO()
    UpstreamPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def pickle_globals(data: bytes) -> list[str]:
    """The globals a pickle names (what a restricted unpickler must admit)."""
    import pickletools

    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
    return sorted(found)


def load_pickle(path: Path):
    # trusted inputs: the official dictionaries (sha256-checked) and our own outputs
    with open(path, "rb") as f:
        return pickle.load(f)


def check_pickler(real: dict[str, dict], real_dir: Path) -> bool:
    return all(
        upstream_dumps(real[name], PICKLE_PROTOCOL[name]) == (real_dir / name).read_bytes()
        for name in real
    )


# ---------------------------------------------------------------------------------------------
# dictionaries


def make_dictionaries(real: dict[str, dict], n_genes: int, rng: np.random.Generator):
    tok_real = real["token_dictionary_gc30M.pkl"]
    med_real = real["gene_median_dictionary_gc30M.pkl"]
    names_real = real["gene_name_id_dict_gc30M.pkl"]
    genes_real = [g for g in tok_real if g not in ("<pad>", "<mask>")]
    counts = Counter(float(med_real[g]) for g in genes_real)
    shared = [g for g in genes_real if counts[float(med_real[g])] > 1]
    retired = [g for g in genes_real if not g.startswith("ENSG0")]
    chosen = set(shared) | set(rng.choice(retired, size=3, replace=False).tolist())
    rest = [g for g in genes_real if g not in chosen]
    chosen |= set(rng.choice(rest, size=n_genes - len(chosen), replace=False).tolist())
    genes = [g for g in genes_real if g in chosen]  # official order (sorted ids)
    token = {"<pad>": tok_real["<pad>"], "<mask>": tok_real["<mask>"]}
    for i, g in enumerate(genes):
        token[g] = np.int16(i + 2)
    median = {g: med_real[g] for g in med_real if g in chosen}
    names = {s: g for s, g in names_real.items() if g in chosen}
    mapping = {g: g for g in genes}
    dicts = {
        "token_dictionary_gc30M.pkl": token,
        "gene_median_dictionary_gc30M.pkl": median,
        "gene_name_id_dict_gc30M.pkl": names,
        "ensembl_mapping_dict_gc30M.pkl": mapping,
    }
    pairs: dict[float, list[str]] = {}
    for g in genes:
        if counts[float(med_real[g])] > 1:
            pairs.setdefault(float(med_real[g]), []).append(g)
    absent_pool = [g for g in genes_real if g not in chosen]
    return dicts, genes, [tuple(v) for v in pairs.values()], absent_pool


# ---------------------------------------------------------------------------------------------
# data


def scaled_values(x: np.ndarray, n_counts: float, medians: np.ndarray) -> np.ndarray:
    """Median-scaled values in the official order of operations (float64)."""
    return (x.astype(np.float64) / n_counts * TARGET_SUM) / medians


def tie_runs(values) -> list[list[int]]:
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            if i - start > 1:
                runs.append([start, i])
            start = i
    return runs


def make_cell(rng, plan, cols, mu, n_slots):
    """Counts for one cell: plan = (n_expressed dictionary columns, tie_free)."""
    k, tie_free = plan
    dict_cols = cols["dict_nonzero"]  # dictionary columns allowed to be non-zero (incl. duplicate)
    pair_cols = cols["pairs"]
    dup_a, dup_b = cols["dup"]
    x = np.zeros(cols["n_vars"], dtype=np.float64)
    # pair genes first (so that tie cells have many ties), then the other columns up to k
    pair_flat = [c for p in pair_cols for c in p]
    p_pair = 0.35 if tie_free else 0.85
    expressed = [c for c in pair_flat if rng.random() < p_pair]
    if dup_a not in expressed and rng.random() < 0.6:
        expressed += [dup_a, dup_b]
    expressed = expressed[:k]
    others = [c for c in dict_cols if c not in set(expressed)]
    expressed += rng.choice(others, size=k - len(expressed), replace=False).tolist()
    scale = rng.uniform(0.4, 2.5)
    for c in expressed:
        x[c] = 1 + rng.poisson(mu[c] * scale)
    for a, b in [*pair_cols, (dup_a, dup_b)]:
        if x[a] > 0 and x[b] > 0:
            if tie_free:
                if x[a] == x[b]:
                    x[b] += 1
            elif rng.random() < (0.5 if a == dup_a else 0.8):
                x[b] = x[a] = rng.integers(1, 6)
    for c in cols["absent"]:
        if rng.random() < 0.3:
            x[c] = 1 + rng.poisson(mu[c] * scale)
    return x


def cell_ok(x, plan, cols, med_by_col, n_slots) -> bool:
    k, tie_free = plan
    dcols = cols["dict_all"]
    n = x.sum()
    xs = x[dcols]
    nz = xs > 0
    if int(nz.sum()) != k:
        return False
    v = np.sort(scaled_values(xs[nz], n, med_by_col[nz]))[::-1]
    uniq = np.unique(v)[::-1]
    if len(uniq) > 1 and np.min((uniq[:-1] - uniq[1:]) / uniq[:-1]) <= 1e-6:
        return False  # near-ties: the kept order would depend on rounding
    if tie_free and len(uniq) != len(v):
        return False
    if not tie_free and not tie_runs(v[:n_slots].tolist()):
        return False
    # no tie straddling the truncation point
    return not (k > n_slots and v[n_slots - 1] == v[n_slots])


def make_data(args, genes, pairs, absent_pool, dicts, rng):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    names_inv = {g: s for s, g in dicts["gene_name_id_dict_gc30M.pkl"].items()}
    median = dicts["gene_median_dictionary_gc30M.pkl"]
    pair_genes = [g for p in pairs for g in p]
    retired = [g for g in genes if not g.startswith("ENSG0")]
    others = [g for g in genes if g not in set(pair_genes) | set(retired)]
    n_plain = args.n_vars - len(pair_genes) - len(retired)
    plain = rng.choice(others, size=n_plain, replace=False).tolist()
    zero_genes = plain[: args.n_zero]
    dup_gene = plain[args.n_zero]
    absent = rng.choice(absent_pool, size=args.n_absent, replace=False).tolist()
    ids = pair_genes + retired + plain + absent
    order = rng.permutation(len(ids)).tolist()
    ids = [ids[i] for i in order]
    ids.insert(int(rng.integers(0, len(ids) + 1)), dup_gene)  # the duplicated id: a second column
    var_names, seen = [], Counter()
    for g in ids:
        s = names_inv.get(g, g)
        var_names.append(s if seen[s] == 0 else f"{s}-{seen[s]}")
        seen[s] += 1
    col = {}
    for i, g in enumerate(ids):
        col.setdefault(g, []).append(i)
    token_genes = set(genes)
    dict_all = [i for i, g in enumerate(ids) if g in token_genes]
    cols = {
        "n_vars": len(ids),
        "dict_all": dict_all,
        "dict_nonzero": [i for i in dict_all if ids[i] not in set(zero_genes)],
        "pairs": [(col[a][0], col[b][0]) for a, b in pairs],
        "dup": tuple(col[dup_gene]),
        "absent": [col[g][0] for g in absent],
    }
    med_by_col = np.array([float(median[ids[i]]) for i in dict_all])
    mu = np.exp(rng.normal(0.2, 1.1, size=len(ids)))

    n_cells, n_slots = args.n_cells, args.max_input
    deep_k = [n_slots, n_slots + 1, n_slots + 44, n_slots + 144, len(cols["dict_nonzero"]) - 8]
    deep_cells = sorted(rng.choice(n_cells, size=len(deep_k), replace=False).tolist())
    k_of = {c: int(rng.integers(30, int(n_slots * 0.9))) for c in range(n_cells)}
    for c, k in zip(deep_cells, deep_k, strict=True):
        k_of[c] = k
    n_free = round(args.tie_free_frac * n_cells)
    # one truncated cell is tie-free, so truncation is also checked end to end
    free = {deep_cells[2]}
    pool = [c for c in range(n_cells) if c not in deep_cells]
    free |= set(rng.choice(pool, size=n_free - 1, replace=False).tolist())
    rows = []
    for c in range(n_cells):
        plan = (k_of[c], c in free)
        for _ in range(1000):
            x = make_cell(rng, plan, cols, mu, n_slots)
            if cell_ok(x, plan, cols, med_by_col, n_slots):
                break
        else:
            raise RuntimeError(f"could not draw cell {c} with plan {plan}")
        rows.append(x)
    X = np.vstack(rows)
    cell_ids = [f"cell{c:03d}" for c in range(n_cells)]
    obs = pd.DataFrame(
        {
            "n_counts": X.sum(axis=1).astype(np.float64),
            "cell_id": cell_ids,
            "cell_type": pd.Categorical(rng.choice(["A", "B", "C"], size=n_cells)),
        },
        index=cell_ids,
    )
    var = pd.DataFrame({"ensembl_id": ids}, index=var_names)
    adata = ad.AnnData(X=sp.csr_matrix(X.astype(np.float32)), obs=obs, var=var)
    facts = {
        "dup_gene": dup_gene,
        "dup_columns": list(cols["dup"]),
        "zero_genes": zero_genes,
        "absent": absent,
        "pair_genes": [list(p) for p in pairs],
        "retired_ids": retired,
        "deep_cells": [cell_ids[c] for c in deep_cells],
        "deep_k": deep_k,
        "tie_free_planned": sorted(cell_ids[c] for c in free),
    }
    return adata, facts


# ---------------------------------------------------------------------------------------------
# checkpoint


def make_checkpoint(args, vocab_size: int, out: Path):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        architectures=["BertForMaskedLM"],
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        hidden_act="relu",
        hidden_dropout_prob=0.02,
        attention_probs_dropout_prob=0.02,
        max_position_embeddings=args.max_input,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        position_embedding_type="absolute",
        use_cache=True,
    )
    torch.manual_seed(args.seed)
    model = BertForMaskedLM(config)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embeddings" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
                if "word_embeddings" in name:
                    p[0].zero_()  # <pad> row, as nn.Embedding(padding_idx=0) initialises it
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    model.save_pretrained(out, safe_serialization=True)
    # the official Geneformer-V1-10M folder has no generation_config.json (transformers 4.46 writes
    # one for BertForMaskedLM); keep the official layout: config.json + model.safetensors
    (out / "generation_config.json").unlink(missing_ok=True)
    (out / "model.safetensors").chmod(0o644)
    return json.loads((out / "config.json").read_text())


# ---------------------------------------------------------------------------------------------
# official code


def import_official(src: Path, dict_dir: Path):
    pkg_dir = src / "geneformer"
    pkg = types.ModuleType("geneformer")
    pkg.__path__ = [str(pkg_dir)]
    pkg.__file__ = str(pkg_dir / "__init__.py")
    missing = dict_dir / "V2-dictionaries-not-used"
    # the constants of the official geneformer/__init__.py
    pkg.GENE_MEDIAN_FILE = missing / "gene_median_dictionary_gc104M.pkl"
    pkg.TOKEN_DICTIONARY_FILE = missing / "token_dictionary_gc104M.pkl"
    pkg.ENSEMBL_DICTIONARY_FILE = missing / "gene_name_id_dict_gc104M.pkl"
    pkg.ENSEMBL_MAPPING_FILE = missing / "ensembl_mapping_dict_gc104M.pkl"
    pkg.GENE_MEDIAN_FILE_30M = dict_dir / "gene_median_dictionary_gc30M.pkl"
    pkg.TOKEN_DICTIONARY_FILE_30M = dict_dir / "token_dictionary_gc30M.pkl"
    pkg.ENSEMBL_DICTIONARY_FILE_30M = dict_dir / "gene_name_id_dict_gc30M.pkl"
    pkg.ENSEMBL_MAPPING_FILE_30M = dict_dir / "ensembl_mapping_dict_gc30M.pkl"
    sys.modules["geneformer"] = pkg
    tk = importlib.import_module("geneformer.tokenizer")
    pu = importlib.import_module("geneformer.perturber_utils")
    ee = importlib.import_module("geneformer.emb_extractor")
    return tk, pu, ee


@contextlib.contextmanager
def cuda_to_cpu():
    """Map the official hard-coded device "cuda" to the CPU, nothing else."""
    import torch

    orig_tensor, orig_to = torch.tensor, torch.Tensor.to

    def cpu(d):
        return "cpu" if (d == "cuda" or (isinstance(d, torch.device) and d.type == "cuda")) else d

    def tensor(*a, **k):
        if "device" in k:
            k["device"] = cpu(k["device"])
        return orig_tensor(*a, **k)

    def to(self, *a, **k):
        a = tuple(cpu(x) for x in a)
        if "device" in k:
            k["device"] = cpu(k["device"])
        return orig_to(self, *a, **k)

    torch.tensor, torch.Tensor.to = tensor, to
    try:
        yield
    finally:
        torch.tensor, torch.Tensor.to = orig_tensor, orig_to


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("src", type=Path, help="directory holding the official geneformer/ files")
    ap.add_argument("out", type=Path, help="output directory (replaced)")
    ap.add_argument("--real-dicts", type=Path, required=True, help="dir with the *_gc30M.pkl files")
    ap.add_argument("--max-input", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=64)
    ap.add_argument("--n-genes", type=int, default=1000, help="genes in the tiny dictionaries")
    ap.add_argument("--n-vars", type=int, default=560, help="dictionary genes in the data")
    ap.add_argument("--n-zero", type=int, default=20, help="dictionary genes zero in every cell")
    ap.add_argument("--n-absent", type=int, default=40, help="ids absent from the dictionary")
    ap.add_argument("--n-cells", type=int, default=40)
    ap.add_argument("--tie-free-frac", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commit", default=OFFICIAL_COMMIT)
    ap.add_argument("--mirror", default=MIRROR)
    args = ap.parse_args(argv)

    src = args.src.resolve()
    official_sha = {f: sha256(src / "geneformer" / f) for f in OFFICIAL_FILES}
    rng = np.random.default_rng(args.seed)

    real = {name: load_pickle(args.real_dicts / name) for name in OFFICIAL_LFS_SHA256}
    real_sources = {
        name: {
            "sha256": sha256(args.real_dicts / name),
            "bytes": (args.real_dicts / name).stat().st_size,
            "matches_official_lfs_pointer": sha256(args.real_dicts / name) == oid,
        }
        for name, oid in OFFICIAL_LFS_SHA256.items()
    }
    if not all(v["matches_official_lfs_pointer"] for v in real_sources.values()):
        raise SystemExit("the --real-dicts files are not the official gc30M dictionaries")
    repickles_identically = check_pickler(real, args.real_dicts)
    if not repickles_identically:
        raise SystemExit("UpstreamPickler does not reproduce the official pickles")

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "dictionaries").mkdir(parents=True)
    dicts, genes, pairs, absent_pool = make_dictionaries(real, args.n_genes, rng)
    for name, d in dicts.items():
        (out / "dictionaries" / name).write_bytes(upstream_dumps(d, PICKLE_PROTOCOL[name]))
    dict_dir = (out / "dictionaries").resolve()

    adata, facts = make_data(args, genes, pairs, absent_pool, dicts, rng)
    adata.write_h5ad(out / "data.h5ad")
    config = make_checkpoint(args, len(dicts["token_dictionary_gc30M.pkl"]), out / "checkpoint")

    tk_mod, _pu, ee = import_official(src, dict_dir)
    n_slots = args.max_input
    work = Path(tempfile.mkdtemp(prefix="gf_v1_fixture_"))
    try:
        (work / "in").mkdir()
        shutil.copy(out / "data.h5ad", work / "in" / "data.h5ad")
        tk = tk_mod.TranscriptomeTokenizer(
            custom_attr_name_dict={"cell_id": "cell_id"}, nproc=1, model_version="V1"
        )
        forced_input_size = tk.model_input_size
        tk.model_input_size = n_slots  # deviation 2: the input size V1 forces is overridden
        tk.tokenize_data(work / "in", work, PREFIX, file_format="h5ad")
        uncropped, meta, _ = tk.tokenize_files(work / "in", "h5ad")
        from datasets import load_from_disk

        ds_path = work / f"{PREFIX}.dataset"
        ds = load_from_disk(str(ds_path))
        ds_features = {k: str(v) for k, v in ds.features.items()}
        official = {
            cid: (list(map(int, ids)), int(n))
            for cid, ids, n in zip(ds["cell_id"], ds["input_ids"], ds["length"], strict=True)
        }
        unc = {cid: [int(t) for t in u] for cid, u in zip(meta["cell_id"], uncropped, strict=True)}
        uncropped_dtype = str(uncropped[0].dtype)

        embs = {}
        emb_calls = []
        for layer in (-1, 0):
            ex = ee.EmbExtractor(
                model_type="Pretrained",
                emb_mode="cell",
                emb_layer=layer,
                max_ncells=None,
                emb_label=["cell_id"],
                forward_batch_size=args.batch_size,
                nproc=1,
                model_version="V1",
            )
            emb_calls.append({"emb_mode": ex.emb_mode, "pad_token_id": ex.pad_token_id})
            with cuda_to_cpu():
                df = ex.extract_embs(str(out / "checkpoint"), str(ds_path), str(work), f"e{layer}")
            df = df.set_index("cell_id")
            embs[layer] = df.loc[list(adata.obs["cell_id"])].to_numpy(dtype=np.float32)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # ---- tokens.json: official tokens + our annotation (values, tie runs)
    token = dicts["token_dictionary_gc30M.pkl"]
    median = dicts["gene_median_dictionary_gc30M.pkl"]
    ids = list(adata.var["ensembl_id"])
    dcols = [i for i, g in enumerate(ids) if g in token]
    col_tokens = np.array([int(token[ids[i]]) for i in dcols])
    col_meds = np.array([float(median[ids[i]]) for i in dcols])
    X = adata.X.toarray()
    rec = {
        k: []
        for k in (
            "cell_id",
            "input_ids",
            "length",
            "input_ids_uncropped",
            "values",
            "tie_runs",
            "official_equals_stable_column_order",
        )
    }
    dup_token = int(token[facts["dup_gene"]])
    cells_dup_twice, cells_dup_tied = [], []
    for r, cid in enumerate(adata.obs["cell_id"]):
        x = X[r, dcols]
        nz = np.nonzero(x)[0]
        v = scaled_values(x[nz], float(adata.obs["n_counts"].iloc[r]), col_meds[nz])
        stable = np.argsort(-v, kind="stable")
        off_ids, off_len = official[cid]
        u = unc[cid]
        # annotate the official order with values: match tokens in order (duplicates: same value
        # only when tied, otherwise the larger value comes first, as the ranking puts it)
        pool: dict[int, list[float]] = {}
        for t, val in zip(col_tokens[nz].tolist(), v.tolist(), strict=True):
            pool.setdefault(t, []).append(val)
        for t in pool:
            pool[t].sort(reverse=True)
        vals = [pool[t].pop(0) for t in u]
        assert all(a >= b for a, b in itertools.pairwise(vals)), cid
        assert sorted(vals, reverse=True) == sorted(v.tolist(), reverse=True)
        assert off_ids == u[:n_slots], cid
        assert off_len == len(off_ids), cid
        assert len(u) <= n_slots or vals[n_slots - 1] != vals[n_slots], cid
        rec["cell_id"].append(cid)
        rec["input_ids"].append(off_ids)
        rec["length"].append(off_len)
        rec["input_ids_uncropped"].append(u)
        rec["values"].append(vals[:n_slots])
        rec["tie_runs"].append(tie_runs(vals[:n_slots]))
        rec["official_equals_stable_column_order"].append(col_tokens[nz][stable].tolist() == u)
        if u.count(dup_token) == 2:
            cells_dup_twice.append(cid)
            pos = [i for i, t in enumerate(u) if t == dup_token]
            if vals[pos[0]] == vals[pos[1]]:
                cells_dup_tied.append(cid)
    rec["collapse_triggered"] = False
    (out / "tokens.json").write_text(json.dumps(rec))
    for layer, e in embs.items():
        np.save(out / f"emb_cell_layer{layer}.npy", e)

    # ---- self-check with plain transformers: unpadded single-cell forwards from tokens.json
    stable_ids = {}
    for r, runs in enumerate(rec["tie_runs"]):
        if runs:
            x = X[r, dcols]
            nz = np.nonzero(x)[0]
            v = scaled_values(x[nz], float(adata.obs["n_counts"].iloc[r]), col_meds[nz])
            stable_ids[r] = col_tokens[nz][np.argsort(-v, kind="stable")][:n_slots].tolist()
    self_check = recompute_check(out, args.layers, stable_ids)

    n_unc = [len(u) for u in rec["input_ids_uncropped"]]
    cells = rec["cell_id"]
    import anndata
    import datasets
    import pandas
    import scanpy
    import scipy
    import torch
    import transformers
    from numpy._core._multiarray_umath import __cpu_features__ as cpu

    fixture = {
        "version": "v1",
        "official_commit": args.commit,
        "mirror": args.mirror,
        "official_files_sha256": official_sha,
        "official_init_executed": False,
        "options": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "src": "<exported official source tree>",
            "real_dicts": "<official gc30M dictionaries>",
            "out": "tests/data/geneformer-tiny-v1",
        },
        "model_input_size": n_slots,
        "gene_slots": n_slots,
        "model_input_size_forced_by_V1": forced_input_size,
        "config": {
            k: config[k]
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "max_position_embeddings",
                "vocab_size",
                "hidden_act",
                "pad_token_id",
                "layer_norm_eps",
                "position_embedding_type",
                "type_vocab_size",
            )
        },
        "official_config_scaled_from": "Geneformer-V1-10M",
        "official_config": OFFICIAL_V1_CONFIG,
        "dictionaries": {
            "kind": "real",
            "files": {name: len(d) for name, d in dicts.items()},
            "sha256": {name: sha256(out / "dictionaries" / name) for name in dicts},
            "pickle_protocol": PICKLE_PROTOCOL,
            "pickle_globals": {
                name: pickle_globals((out / "dictionaries" / name).read_bytes()) for name in dicts
            },
            "real_sources": real_sources,
            "upstream_pickler_reproduces_official_files": repickles_identically,
            "genes_sharing_a_median": sum(len(p) for p in pairs),
            "retired_ENSGR_ids": facts["retired_ids"],
        },
        "tokenizer_call": {
            "TranscriptomeTokenizer": {
                "custom_attr_name_dict": {"cell_id": "cell_id"},
                "nproc": 1,
                "model_version": "V1",
            },
            "after_construction": {"model_input_size": n_slots},
            "tokenize_data": {"file_format": "h5ad"},
            "input_ids_uncropped_from": "TranscriptomeTokenizer.tokenize_files (same object)",
            "dataset_features": ds_features,
            "tokenize_files_dtype": uncropped_dtype,
        },
        "emb_call": {
            "EmbExtractor": {
                "model_type": "Pretrained",
                "emb_mode": "cell",
                "emb_layer": [-1, 0],
                "max_ncells": None,
                "emb_label": ["cell_id"],
                "forward_batch_size": args.batch_size,
                "nproc": 1,
                "model_version": "V1",
            },
            "resolved": emb_calls,
        },
        "deviations_from_upstream": [
            "geneformer/__init__.py not executed: a stand-in package module defines its eight "
            "dictionary path constants; *_30M point at dictionaries/ here, the V2 ones at a "
            "missing path (V1 reads only the *_30M constants, overriding passed paths)",
            f"TranscriptomeTokenizer.model_input_size set to {n_slots} after construction "
            f"(model_version='V1' forces {forced_input_size})",
            "torch.tensor(device='cuda') and Tensor.to('cuda') mapped to the CPU during "
            "EmbExtractor.extract_embs (get_embs and gen_attention_mask hard-code cuda)",
        ],
        "data": {
            "n_cells": adata.n_obs,
            "n_vars": adata.n_vars,
            "sparse": True,
            "dtype": str(adata.X.dtype),
            "n_dictionary_genes_in_input": len(set(ids) & set(token)),
            "dictionary_columns": len(dcols),
            "all_zero_dictionary_genes": len(facts["zero_genes"]),
            "absent_ids": len(facts["absent"]),
            "exact_duplicate_id": facts["dup_gene"],
            "exact_duplicate_token": dup_token,
            "exact_duplicate_columns": facts["dup_columns"],
            "collapse_triggered": False,
            "cells_with_repeated_token": cells_dup_twice,
            "cells_with_repeated_token_tied": cells_dup_tied,
            "truncated_cells": [c for c, n in zip(cells, n_unc, strict=True) if n > n_slots],
            "cells_at_exactly_input_size": [
                c for c, n in zip(cells, n_unc, strict=True) if n == n_slots
            ],
            "expressed_dictionary_columns": dict(zip(cells, n_unc, strict=True)),
            "tie_free_cells": [c for c, t in zip(cells, rec["tie_runs"], strict=True) if not t],
            "tie_free_cells_planned": facts["tie_free_planned"],
            "cells_with_ties": sum(1 for t in rec["tie_runs"] if t),
            "tie_runs_total": sum(len(t) for t in rec["tie_runs"]),
            "tie_run_lengths": dict(Counter(e - s for t in rec["tie_runs"] for s, e in t)),
            "cells_where_official_equals_stable_order": sum(
                rec["official_equals_stable_column_order"]
            ),
        },
        "embeddings": {f"emb_cell_layer{layer}.npy": list(e.shape) for layer, e in embs.items()},
        "self_check": self_check,
        "packages": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "pandas": pandas.__version__,
            "anndata": anndata.__version__,
            "scanpy": scanpy.__version__,
        },
        "python": platform.python_version(),
        "numpy_cpu_features": {k: bool(cpu[k]) for k in ("AVX2", "AVX512F", "AVX512_SKX")},
    }
    (out / "fixture.json").write_text(json.dumps(fixture, indent=1) + "\n")
    print(json.dumps(fixture["data"], indent=1))
    print(json.dumps(self_check, indent=1))


def recompute_check(out: Path, n_layers: int, stable_ids: dict[int, list[int]]) -> dict:
    """Cell embeddings from tokens.json with plain transformers, one unpadded cell at a time.

    Also: how far the embeddings of the tie cells move when their ties are put in column order
    (stable ranking) instead of the official order.
    """
    import torch
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(out / "checkpoint", output_hidden_states=True).eval()
    tokens = json.loads((out / "tokens.json").read_text())
    res = {}
    for layer in (-1, 0):
        stored = np.load(out / f"emb_cell_layer{layer}.npy")
        diffs, moved = [], []
        for i, ids in enumerate(tokens["input_ids"]):
            with torch.no_grad():
                h = model(input_ids=torch.tensor([ids])).hidden_states[n_layers + layer]
            diffs.append(float(np.abs(h[0].mean(0).numpy() - stored[i]).max()))
            if i in stable_ids and stable_ids[i] != ids:
                with torch.no_grad():
                    hs = model(input_ids=torch.tensor([stable_ids[i]]))
                e = hs.hidden_states[n_layers + layer][0].mean(0).numpy()
                moved.append(float(np.abs(e - stored[i]).max()))
        res[f"emb_cell_layer{layer}_max_abs_diff"] = max(diffs)
        res[f"emb_cell_layer{layer}_stable_tie_order_max_abs_diff_range"] = [min(moved), max(moved)]
    return res


if __name__ == "__main__":
    main()
