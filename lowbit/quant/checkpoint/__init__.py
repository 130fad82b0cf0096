"""Quantized Hugging Face checkpoints (AutoAWQ GEMM or compressed-tensors): `save` writes them,
`load` reads ours and the reference tools' back into one canonical form."""
from ...models.weights import INDEX_FILE
from .load import QuantizedCheckpoint, load_quantized
from .save import COPIED_FILES, FORMATS, save_quantized, storage_scale_dtype

__all__ = [
    "COPIED_FILES", "FORMATS", "INDEX_FILE", "QuantizedCheckpoint", "load_quantized", "save_quantized",
    "storage_scale_dtype",
]
