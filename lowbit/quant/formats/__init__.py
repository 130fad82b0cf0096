"""On-disk layouts of quantized linears, each converting to and from QuantizedWeight.

awq_gemm:           AutoAWQ "GEMM" tensors (qweight/qzeros/scales), what AutoAWQ, transformers
                    and vLLM's awq / awq_marlin load.
compressed_tensors: llm-compressor's "pack-quantized" tensors (weight_packed/weight_scale/...),
                    what vLLM's compressed-tensors WNA16 path and transformers load.
"""
from lowbit.quant.formats import awq_gemm, compressed_tensors

FORMATS = ("awq", "compressed-tensors")

__all__ = ["FORMATS", "awq_gemm", "compressed_tensors"]
