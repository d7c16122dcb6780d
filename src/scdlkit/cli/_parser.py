"""The ``scdlkit`` argument parser: its description and the options of each sub-command."""

from __future__ import annotations

import argparse

from scdlkit._shared.strategies import DEFAULT_STRATEGIES, STRATEGIES
from scdlkit._version import __version__
from scdlkit.cli import _commands
from scdlkit.cli._options import (
    HelpFormatter,
    Parser,
    checkpoint_option,
    device_option,
    fraction,
    gene_layer_options,
    input_option,
    key_added_option,
    logging_options,
    output_option,
    paragraphs,
    positive_int,
    positive_number,
    precision_option,
    seed,
    streaming_options,
    unit_interval,
)

__all__ = ["DESCRIPTION", "PROG", "build_parser"]

PROG = "scdlkit"

DESCRIPTION = """\
Adapt the scGPT single-cell foundation model to labelled AnnData for cell-type annotation.
Each command reads an .h5ad file, runs one scdlkit tool and writes the result atomically
(temporary file beside the target, then renamed).

  scdlkit inspect ref.h5ad --label-key cell_type --checkpoint path/to/scGPT_human
  scdlkit adapt ref.h5ad --label-key cell_type -o ref_annotated.h5ad --strategies frozen_probe head
  scdlkit annotate query.h5ad --runner ref_annotated_scdlkit/runner -o query_annotated.h5ad
  scdlkit markers query_annotated.h5ad -o query_markers.h5ad --csv markers.csv
  scdlkit embed cells.h5ad -o cells_embedded.h5ad

Exit codes: 0 success; 1 unexpected error, a bug (with traceback); 2 usage or input error, one
line saying what to fix (bad option, a device this machine lacks, an output that cannot be
written, missing or unreadable file or checkpoint, unusable data, or blocking problems found by
'inspect'); 130 when interrupted. Options and output paths are checked before any work.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``scdlkit`` argument parser with its five sub-commands.

    Returns
    -------
    The parser; each sub-command sets ``func`` to the function that runs it.
    """
    parser = Parser(
        prog=PROG,
        description=paragraphs(DESCRIPTION),
        formatter_class=HelpFormatter,
        epilog="Run 'scdlkit COMMAND --help' for the options of a command.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    logging_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=paragraphs(description),
            formatter_class=HelpFormatter,
        )
        return sub

    # inspect ------------------------------------------------------------------------------
    sub = command(
        "inspect",
        "preflight an AnnData for scGPT (gene overlap, labels, values)",
        "Preflight an AnnData for scGPT: gene overlap with the vocabulary, labels, value type and "
        "sequence lengths (sck.tl.inspect). Reads only the checkpoint's vocab.json and "
        "args.json.\n\n"
        "Prints the report; exits 0 when the data can be used and 2 when blocking problems were "
        "found (the report says how to fix each).",
    )
    input_option(sub, "input AnnData")
    sub.add_argument(
        "--label-key",
        metavar="K",
        help="adata.obs column with cell types (default: none, check genes and values only)",
    )
    checkpoint_option(sub, default="whole-human")
    gene_layer_options(sub)
    output_option(sub, required=False, what="also write the AnnData with the report in uns[KEY]")
    sub.add_argument(
        "--json",
        metavar="REPORT.json",
        help="also write the report as JSON (written atomically, also when problems were found)",
    )
    key_added_option(sub, "scgpt_inspect", "uns key of the report in OUT.h5ad")
    logging_options(sub, top=False)
    sub.set_defaults(func=_commands.run_inspect)

    # embed --------------------------------------------------------------------------------
    sub = command(
        "embed",
        "embed cells with the frozen scGPT encoder",
        "Embed cells with a pretrained scGPT encoder, no training (sck.tl.embed). Writes the "
        "L2-normalised <cls> embedding to obsm['X_KEY'] and the parameters to uns['KEY'].",
    )
    input_option(sub, "input AnnData with gene symbols, raw counts or log-normalised values")
    output_option(sub, required=True, what="AnnData to write, with obsm['X_KEY'] added")
    checkpoint_option(sub, default="whole-human")
    gene_layer_options(sub)
    sub.add_argument(
        "--batch-size", type=positive_int, default=64, metavar="N", help="cells per forward pass"
    )
    device_option(sub)
    precision_option(sub)
    streaming_options(sub)
    key_added_option(sub, "scgpt", "writes obsm['X_KEY'] and uns['KEY']")
    logging_options(sub, top=False)
    sub.set_defaults(func=_commands.run_embed)

    # adapt --------------------------------------------------------------------------------
    sub = command(
        "adapt",
        "adapt scGPT to labelled cells, compare strategies, keep the best",
        "Adapt scGPT to the labelled cells of a reference (sck.tl.adapt_annotation): fit every "
        "strategy on a stratified train split, rank them by validation macro-F1, keep the best, "
        "label every cell and save the fitted runner for 'scdlkit annotate'.\n\n"
        "Writes obs['KEY'], obs['KEY_confidence'], obs['KEY_split'], obsm['X_KEY'] and "
        "uns['KEY']; prints the comparison table and the runner folder.",
    )
    input_option(sub, "reference AnnData with gene symbols and cell-type labels")
    sub.add_argument(
        "--label-key",
        required=True,
        metavar="K",
        help="adata.obs column with cell types; empty values mark unlabelled cells (left out of "
        "training and evaluation, still labelled)",
    )
    output_option(sub, required=True, what="annotated reference to write")
    checkpoint_option(sub, default="whole-human")
    sub.add_argument(
        "--strategies",
        nargs="+",
        choices=STRATEGIES,
        default=list(DEFAULT_STRATEGIES),
        metavar="S",
        help=f"strategies to compare, among {', '.join(STRATEGIES)} ('baseline': logistic "
        "regression on log-normalised expression, no scGPT) "
        f"(default: {' '.join(DEFAULT_STRATEGIES)})",
    )
    sub.add_argument(
        "--output-dir",
        metavar="DIR",
        help="folder for the saved runner (DIR/runner) and the artifacts (metrics and predictions "
        "CSV, report.md, plots) (default: OUT without .h5ad plus '_scdlkit', beside OUT)",
    )
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in the output folder (default: refuse it)",
    )
    sub.add_argument(
        "--epochs",
        type=positive_int,
        metavar="N",
        help="training epochs of every neural strategy (default: each strategy's own default)",
    )
    sub.add_argument(
        "--lr",
        type=positive_number,
        metavar="LR",
        help="learning rate of every neural strategy (default: each strategy's own default)",
    )
    sub.add_argument(
        "--batch-size",
        type=positive_int,
        default=64,
        metavar="N",
        help="cells per batch for training and inference",
    )
    sub.add_argument(
        "--val-size",
        type=fraction,
        default=0.15,
        metavar="F",
        help="fraction of labelled cells held out to select the best strategy",
    )
    sub.add_argument(
        "--test-size",
        type=fraction,
        default=0.15,
        metavar="F",
        help="fraction of labelled cells held out for the final report",
    )
    sub.add_argument(
        "--random-state",
        type=seed,
        default=42,
        metavar="SEED",
        help="seed of splits, tokenisation, initialisation and training",
    )
    sub.add_argument(
        "--n-repeats",
        type=positive_int,
        default=1,
        metavar="N",
        help="fit every strategy on N splits and report mean and sd of each metric",
    )
    sub.add_argument(
        "--calibration-size",
        type=fraction,
        default=0.1,
        metavar="F",
        help="fraction of labelled cells, taken from the training cells, that calibrate the "
        "prediction sets of 'scdlkit annotate --error-rate' (neither train nor choose; 0: none)",
    )
    sub.add_argument(
        "--refit",
        choices=("auto", "always", "never"),
        default="auto",
        help="after selection, fit the kept model again on every labelled cell: 'auto' for "
        "frozen_probe and baseline, 'always' also for trained strategies, 'never' "
        "(default: auto; reported metrics stay those of the held-out cells)",
    )
    sub.add_argument(
        "--keep",
        choices=("best", "all"),
        default="best",
        help="save the best strategy's model, or every strategy's ('all'; label with any via "
        "'scdlkit annotate --strategy') (default: best)",
    )
    device_option(sub)
    precision_option(sub)
    gene_layer_options(sub)
    group = sub.add_argument_group("batches (donors, studies, technologies)")
    group.add_argument(
        "--batch-key",
        metavar="B",
        help="adata.obs column of batches: test metrics are also reported per batch "
        "(default: none)",
    )
    group.add_argument(
        "--split-by",
        choices=("cells", "batch"),
        default="cells",
        help="'cells': stratified random split; 'batch': hold out whole batches for validation "
        "and test, to measure transfer to unseen batches (needs --batch-key)",
    )
    group.add_argument(
        "--test-batches",
        nargs="+",
        metavar="NAME",
        help="with --split-by batch, the batches to test on (default: drawn with --random-state)",
    )
    group.add_argument(
        "--calibration-batches",
        nargs="+",
        metavar="NAME",
        help="calibrate the prediction sets on these batches (not test or validation ones), so "
        "that their error rate holds for new batches (needs --batch-key)",
    )
    group.add_argument(
        "--val-batches",
        nargs="+",
        metavar="NAME",
        help="with --split-by batch, the batches to validate on (default: drawn)",
    )
    sub.add_argument(
        "--confidence-threshold",
        type=unit_interval,
        metavar="P",
        help="label cells whose top probability is below P as 'Unknown' (default: none)",
    )
    sub.add_argument(
        "--attention-dropout",
        type=fraction,
        metavar="P",
        help="dropout on attention weights while training, over the encoder_dropout training "
        "setting (default 0; the checkpoint's is 0.2); >0 is several times slower on CPU",
    )
    key_added_option(sub, "scgpt_annotation", "prefix of the written obs/obsm/uns slots")
    logging_options(sub, top=False)
    sub.set_defaults(func=_commands.run_adapt)

    # annotate -----------------------------------------------------------------------------
    sub = command(
        "annotate",
        "label new cells with a runner saved by 'scdlkit adapt'",
        "Label query cells with a fitted annotation runner (sck.tl.annotate). Writes "
        "obs['KEY'], obs['KEY_confidence'], obs['KEY_split'] ('query'), obsm['X_KEY'] and "
        "uns['KEY'].",
    )
    input_option(sub, "query AnnData with gene symbols")
    sub.add_argument(
        "--runner",
        required=True,
        metavar="DIR",
        help="folder of a saved runner: the 'runner folder' printed by 'scdlkit adapt' "
        "(uns['scgpt_annotation']['runner_dir'] of its output)",
    )
    output_option(sub, required=True, what="annotated query to write")
    checkpoint_option(sub, default=None)
    gene_layer_options(sub, inherit=True)
    device_option(sub)
    streaming_options(sub)
    key_added_option(sub, "scgpt_annotation", "prefix of the written obs/obsm/uns slots")
    labelling_options(sub)
    logging_options(sub, top=False)
    sub.set_defaults(func=_commands.run_annotate)

    # markers ------------------------------------------------------------------------------
    sub = command(
        "markers",
        "the genes behind each predicted label of an annotated AnnData",
        "The genes behind each predicted label (sck.tl.annotation_markers) of an AnnData "
        "labelled by 'scdlkit annotate' or 'scdlkit adapt': genes with a positive score that "
        "are higher in the label's cells. Writes uns['KEY_markers'] (label, rank, gene, score, "
        "expression_difference) and prints the top genes of each label.",
    )
    input_option(sub, "AnnData labelled by 'scdlkit annotate' or 'scdlkit adapt'")
    output_option(sub, required=True, what="AnnData with the markers to write")
    marker_options(sub)
    checkpoint_option(sub, default=None)
    gene_layer_options(sub, inherit=True)
    device_option(sub)
    sub.add_argument(
        "--backed",
        action="store_true",
        help="open the input backed (read_h5ad(backed='r')) and read it in chunks",
    )
    logging_options(sub, top=False)
    sub.set_defaults(func=_commands.run_markers)
    return parser


def marker_options(parser: argparse.ArgumentParser) -> None:
    """``markers``' options, those of :func:`scdlkit.tl.annotation_markers`."""
    parser.add_argument(
        "--key",
        default="scgpt_annotation",
        metavar="KEY",
        help="the --key-added of the annotation: reads obs['KEY'] and uns['KEY'] "
        "(default: 'scgpt_annotation')",
    )
    parser.add_argument(
        "--runner",
        metavar="DIR",
        help="folder of the saved runner (default: the one uns['KEY'] records, checked "
        "against the sha256 recorded)",
    )
    parser.add_argument(
        "--n-genes",
        type=positive_int,
        default=20,
        metavar="N",
        help="genes per label (default: 20)",
    )
    parser.add_argument(
        "--n-steps",
        type=positive_int,
        default=20,
        metavar="N",
        help="integration points of integrated gradients, scGPT strategies (default: 20)",
    )
    parser.add_argument(
        "--max-cells-per-label",
        type=positive_int,
        default=500,
        metavar="N",
        help="cells per label used by integrated gradients, a seeded subset (default: 500)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help="cells per forward/backward pass (default: the runner's)",
    )
    parser.add_argument(
        "--random-state",
        type=seed,
        default=0,
        metavar="SEED",
        help="seeds the subset of --max-cells-per-label (default: 0)",
    )
    parser.add_argument(
        "--csv",
        metavar="FILE.csv",
        help="also write the markers table as CSV (written atomically)",
    )


def labelling_options(parser: argparse.ArgumentParser) -> None:
    """``annotate``'s labelling options, those of :func:`scdlkit.tl.annotate`."""
    parser.add_argument(
        "--strategy",
        metavar="S",
        help="label with this strategy of a runner saved with --keep all (default: the best)",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=unit_interval,
        metavar="P",
        help="label cells whose top probability is below P as --unknown-label "
        "(default: the runner's own threshold)",
    )
    parser.add_argument(
        "--error-rate",
        type=unit_interval,
        metavar="A",
        help="label with conformal prediction sets that miss the true label with probability at "
        "most A (e.g. 0.1); cells whose set is not a single class get --unknown-label. Writes "
        "obsm['KEY_prediction_set'] and obs['KEY_set_size'] (not with --confidence-threshold)",
    )
    parser.add_argument(
        "--unknown-label",
        default="Unknown",
        metavar="NAME",
        help="label of the cells under the threshold (default: 'Unknown')",
    )
    parser.add_argument(
        "--majority-voting",
        action="store_true",
        help="also write obs['KEY_majority_voting']: the majority label of each cell's cluster",
    )
    parser.add_argument(
        "--over-clustering",
        metavar="COLUMN",
        help="obs column with the clusters to vote in (default: over-cluster the cells on "
        "their expression, as CellTypist: Leiden with igraph installed, else k-means with a "
        "warning; no vote on 50 cells or fewer)",
    )
    parser.add_argument(
        "--min-prop",
        type=unit_interval,
        default=0.0,
        metavar="P",
        help="with --majority-voting: a cluster whose majority label holds a smaller share is "
        "called 'Heterogeneous' (default: 0)",
    )
    parser.add_argument(
        "--no-probabilities",
        dest="probabilities",
        action="store_false",
        help="do not write obsm['KEY_probabilities'], the probability of every class "
        "(default: written)",
    )
