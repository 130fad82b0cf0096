"""`lowbit quantize`: AWQ, GPTQ, AWQ-GPTQ or RTN weight quantization, or SmoothQuant W8A8 (int8 weights
and activations), of a model into a standard checkpoint."""
from __future__ import annotations

import argparse
import signal
import sys

from .engine_flags import add_model_arg


def _group_size(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"group size must be an integer (-1 = per-channel) or 'auto', got {text!r}") from None
    return v


def register(sub: argparse._SubParsersAction) -> None:
    from ..quant.awq_config import AwqConfig
    from ..quant.gptq import ACT_ORDERS, GRIDS, GptqConfig
    from ..quant.calibration import DEFAULT_SAMPLES, DEFAULT_SEQLEN

    d = AwqConfig()
    g = GptqConfig()
    p = sub.add_parser("quantize", help="quantize a model's weights (AWQ, GPTQ, AWQ-GPTQ or RTN) into an AWQ / "
                                        "compressed-tensors checkpoint")
    add_model_arg(p)
    p.add_argument("--method", choices=["awq", "gptq", "awq-gptq", "rtn", "smoothquant"], default="awq",
                   help="awq (default), gptq (Hessian-aware rounding), awq-gptq (AWQ's scales, then GPTQ's "
                        "rounding), the rtn baseline, or smoothquant (W8A8: int8 per-channel weights and int8 "
                        "per-token activations, compressed-tensors int-quantized)")
    p.add_argument("--w-bit", type=int, default=None, help="weight bits, 2..8 (default 4; smoothquant: 8)")
    p.add_argument("--group-size", type=_group_size, default=None,
                   help="quantization group size along the input dim; -1 = per output channel; default auto: "
                        "128 where it divides every layer's input features, else 64 (e.g. SmolLM2-135M), else 32")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric with zero points)")
    p.add_argument("--calib", default=None,
                   help="calibration text: a .jsonl (field 'text') or .txt file, or a Hugging Face dataset name "
                        "(default: the C4 sample shipped with lowbit)")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_SAMPLES, help="calibration blocks (default %(default)s)")
    p.add_argument("--calib-seqlen", type=int, default=DEFAULT_SEQLEN, help="tokens per block (default %(default)s)")
    p.add_argument("--search-samples", type=int, default=d.search_samples,
                   help="blocks used for AWQ's grid-search losses (default %(default)s; 0 = all)")
    p.add_argument("--search-tokens", type=int, default=d.search_tokens,
                   help="tokens sampled from all calibration data for the per-token (MLP, o/down_proj) searches "
                        "(default %(default)s; 0 = all)")
    p.add_argument("--duo-scaling", choices=["on", "off"], default="on",
                   help="scale grid: on = activations and weights (AutoAWQ, default), off = activations only "
                        "(llm-awq, as published)")
    p.add_argument("--no-clip", action="store_true", help="skip AWQ's clipping search")
    p.add_argument("--absolute-loss", action="store_true",
                   help="score the searches on absolute output error, as published (default: error relative "
                        "to each token's residual-stream size, which measured better)")
    p.add_argument("--damp", type=float, default=g.damp,
                   help="GPTQ dampening, a fraction of the Hessian's mean diagonal (default %(default)s)")
    p.add_argument("--act-order", nargs="?", const="group", choices=[*ACT_ORDERS, "none"], default=None,
                   help="GPTQ: round columns in descending activation order. 'weight' (the default for gptq and "
                        "awq-gptq) keeps the original groups (any format); 'group' (the value of a bare "
                        "--act-order) also forms the groups in that order (stored with g_idx: compressed-tensors "
                        "only); 'none': the original column order")
    p.add_argument("--gptq-grid", choices=GRIDS, default=None,
                   help="GPTQ: how each group's scale and zero are chosen: 'mse' (default) shrinks the group's "
                        "range to the least rounding error weighted by the channels' activations; 'minmax' "
                        "spans the group's min and max, as RTN does")
    p.add_argument("--format", dest="fmt", choices=["awq", "compressed-tensors"], default=None,
                   help="checkpoint format: awq (AutoAWQ GEMM, 4-bit only) or compressed-tensors (default awq; "
                        "smoothquant: compressed-tensors)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--seed", type=int, default=0, help="calibration document order")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _act_order(flag: str | None) -> str | None:
    """The GptqConfig value of --act-order: not given -> GPTQ's default; "none" -> off."""
    from ..quant.gptq import GptqConfig

    if flag is None:
        return GptqConfig().act_order
    return None if flag == "none" else flag


def _terminated(signum, _frame):
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    from ..quant.awq_config import AwqConfig
    from ..quant.gptq import GptqConfig
    from ..quant.heap import pin_mmap_threshold
    from ..quant.pipeline import quantize

    gptq_flags = args.act_order is not None or args.damp != GptqConfig().damp or args.gptq_grid is not None
    if args.method not in ("gptq", "awq-gptq") and gptq_flags:
        from ..errors import QuantizationError

        raise QuantizationError("--act-order, --damp and --gptq-grid apply to --method gptq and awq-gptq only")
    cfg = AwqConfig(
        duo_scaling=args.duo_scaling == "on",
        clip=not args.no_clip,
        relative_loss=not args.absolute_loss,
        search_samples=None if args.search_samples == 0 else args.search_samples,
        search_tokens=None if args.search_tokens == 0 else args.search_tokens,
    )
    smooth = args.method == "smoothquant"
    w_bit = args.w_bit if args.w_bit is not None else (8 if smooth else 4)
    fmt = args.fmt or ("compressed-tensors" if smooth else "awq")
    sym = args.sym or smooth  # W8A8 weights are symmetric by definition (check_request refuses the rest)
    pin_mmap_threshold()  # process-wide and permanent: this command owns the process (quant/heap.py)
    # SIGTERM (`timeout`, a job scheduler) unwinds like Ctrl-C, so quantize()'s finally removes its
    # spill folder of finished layers instead of leaving it beside the output (this command owns the process)
    signal.signal(signal.SIGTERM, _terminated)
    report = quantize(
        args.model, args.method, w_bit, args.group_size, sym, args.calib, args.calib_samples,
        args.calib_seqlen, fmt, args.out, args.force, awq_config=cfg, progress=not args.quiet, seed=args.seed,
        gptq_config=GptqConfig(damp=args.damp, act_order=_act_order(args.act_order),
                               grid=args.gptq_grid or GptqConfig().grid),
    )
    t = report.totals
    print(f"wrote {report.out_dir} ({report.method} W{report.bits} g{report.group_size}"
          f"{' sym' if report.sym else ''}, {report.fmt} format, {report.quantized_linears} linears) "
          f"in {report.total_seconds:.1f} s", file=sys.stderr)
    if t and "alphas" in t:
        print(f"layer output error (sum over layers, calibration inputs): W8A8 {t['layer_error_w8a8_sum']:.4g}, "
              f"SmoothQuant {t['layer_error_smoothquant_sum']:.4g}", file=sys.stderr)
    elif t and "layers_awq_better_than_rtn" in t:
        print(f"layer output error (sum over layers, calibration inputs): RTN {t['layer_error_rtn_sum']:.4g}, "
              f"AWQ {t['layer_error_awq_sum']:.4g}; AWQ better on {t['layers_awq_better_than_rtn']}/{report.num_layers} layers",
              file=sys.stderr)
    elif t:
        sums = ", ".join(f"{k[len('layer_error_'):-len('_sum')].upper().replace('_', '-')} {v:.4g}"
                         for k, v in t.items() if k.startswith("layer_error_"))
        print(f"layer output error (sum over layers, calibration inputs): {sums}; {report.method.upper()} better "
              f"than RTN on {t['layers_better_than_rtn']}/{report.num_layers} layers", file=sys.stderr)
    return 0

