"""Runs inside a GPTQModel venv (never a lowbit dependency): quantize a tiny model on CPU with
GPTQModel, save its GPTQ checkpoint, and beside it GPTQModel's own reference: every quantized
linear's dequantized weight (its torch kernel's dequantize_weight) and a greedy continuation.

argv: model_dir out_dir bits desc_act(0/1) sym(0/1) group_size
Needs GPTQMODEL_CPU_WORKERS=2 on a 2-core machine (its default CPU pool refuses to start there).
Used by tests/test_gptq.py::test_gptqmodel_checkpoint_loads (slow, LOWBIT_GPTQMODEL_PYTHON).
"""
import sys

import torch
from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
from safetensors.torch import save_file

model_dir, out_dir, bits, desc_act, sym, group = sys.argv[1:7]
texts = [f"calibration document {i}: " + "the quick brown fox jumps over the lazy dog " * 6 for i in range(32)]
cfg = QuantizeConfig(bits=int(bits), group_size=int(group), desc_act=desc_act == "1", sym=sym == "1")
model = GPTQModel.load(model_dir, cfg, device="cpu")
model.quantize(texts, batch_size=4)
model.save(out_dir)

# the reference, from the saved checkpoint through GPTQModel's own torch kernel (fp16: it has no fp32 path)
q = GPTQModel.load(out_dir, device="cpu", dtype=torch.float16, backend=BACKEND.TORCH)
ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
ref = {"ids": ids}
with torch.no_grad():
    ref["greedy"] = q.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False).contiguous()
    for name, mod in q.model.named_modules():
        if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
            w = mod.dequantize_weight().float()
            ref["W." + name] = (w.t() if w.shape[0] == mod.in_features else w).contiguous()
save_file(ref, f"{out_dir}/peer_reference.safetensors")
