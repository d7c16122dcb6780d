"""scGPT: checkpoints, model, tokenisation, data preparation, adaptation strategies, runner.

Knows nothing about obs/uns key names; ``scdlkit.tl`` writes the results into the AnnData.
"""

try:
    import safetensors  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    msg = (
        "The scGPT path of scdlkit needs its 'foundation' extra: pip install 'scdlkit[foundation]'"
    )
    raise ImportError(msg) from err

from scdlkit._shared.cache import default_cache_dir
from scdlkit.foundation._adapt import adapt_scgpt_annotation, default_runner_dir
from scdlkit.foundation._annotation_model import (
    ScGPTAnnotationModel,
    build_annotation_model,
    load_scgpt_annotation_model,
)
from scdlkit.foundation._attribution import (
    attribution_method,
    class_gene_scores,
    expression_difference,
    top_genes,
)
from scdlkit.foundation._cell_embedding import CellEmbeddings, embed_cells
from scdlkit.foundation._conformal import scale_probabilities
from scdlkit.foundation._data import (
    ScGPTCellDataset,
    ScGPTPreparedData,
    ScGPTSplitData,
    prepare_scgpt_data,
    split_scgpt_data,
)
from scdlkit.foundation._inspect import ScGPTAnnotationDataReport, inspect_annotation_data
from scdlkit.foundation._model_comparison import ModelComparison, adapt_models
from scdlkit.foundation._normalisation import describe_normalisation, normalisation_mismatch
from scdlkit.foundation._runner import ScGPTAnnotationRunner
from scdlkit.foundation._training_settings import STRATEGIES
from scdlkit.foundation.models import (
    MODELS,
    is_model_checkpoint,
    load_encoder,
    model_card,
    resolve_model_checkpoint,
)
from scdlkit.foundation.models.scgpt._checkpoint import (
    OFFICIAL_CHECKPOINTS,
    ScGPTCheckpoint,
    ScGPTModelArgs,
    resolve_checkpoint,
)
from scdlkit.foundation.models.scgpt._genes import GeneMatch, match_genes, tokenize_adata
from scdlkit.foundation.models.scgpt._loading import CheckpointLoadReport, load_scgpt_model
from scdlkit.foundation.models.scgpt._model import ScGPTEncoder
from scdlkit.foundation.models.scgpt._tokenize import ScGPTTokens
from scdlkit.foundation.peft import (
    AdapterConfig,
    IA3Config,
    LoRAConfig,
    PEFTConfig,
    PrefixTuningConfig,
    ScGPTLoRAConfig,
    merge_lora,
)

__all__ = [
    "ModelComparison",
    "adapt_models",
    "attribution_method",
    "class_gene_scores",
    "default_runner_dir",
    "describe_normalisation",
    "expression_difference",
    "normalisation_mismatch",
    "scale_probabilities",
    "top_genes",
    "CellEmbeddings",
    "embed_cells",
    "load_encoder",
    "model_card",
    "resolve_model_checkpoint",
    "MODELS",
    "is_model_checkpoint",
    "STRATEGIES",
    "AdapterConfig",
    "IA3Config",
    "LoRAConfig",
    "PEFTConfig",
    "PrefixTuningConfig",
    "ScGPTAnnotationModel",
    "ScGPTAnnotationRunner",
    "ScGPTLoRAConfig",
    "adapt_scgpt_annotation",
    "build_annotation_model",
    "load_scgpt_annotation_model",
    "merge_lora",
    "OFFICIAL_CHECKPOINTS",
    "CheckpointLoadReport",
    "GeneMatch",
    "ScGPTAnnotationDataReport",
    "ScGPTCellDataset",
    "ScGPTPreparedData",
    "ScGPTSplitData",
    "ScGPTCheckpoint",
    "ScGPTEncoder",
    "ScGPTModelArgs",
    "ScGPTTokens",
    "default_cache_dir",
    "inspect_annotation_data",
    "load_scgpt_model",
    "match_genes",
    "prepare_scgpt_data",
    "resolve_checkpoint",
    "split_scgpt_data",
    "tokenize_adata",
]
