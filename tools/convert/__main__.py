"""The converter's CLI: `python -m tools.convert --src (HF dir | file.gguf) --dst DIR [--dtype D]
[--format hf|orbax] [--tp N] [--quant SCHEME [--calibration TEXT [--recipe awq|gptq]]] [--force]`; errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import sys

from tools.convert.calibrated import W4A16_RECIPES
from tools.convert.checkpoint import DTYPES, ConvertError
from tools.convert.convert import FORMATS, SCHEMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.convert",
        description="Convert a Hugging Face model directory or a llama.cpp GGUF file into a jaxllm model directory.",
    )
    parser.add_argument("--src", required=True, help="Hugging Face model directory (safetensors) or a .gguf file")
    parser.add_argument("--dst", required=True, help="model directory to write (must be absent or empty, or --force)")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="stored weight dtype; default: keep the source's (HF: its token embedding's dtype; "
        "GGUF: float32, the dequantised values exactly)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="hf",
        help="hf: safetensors (sharded above 2 GiB per file); orbax: a checkpoint saved from a --tp mesh",
    )
    parser.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel degree: checked against the model; the orbax save mesh"
    )
    parser.add_argument(
        "--quant", choices=SCHEMES, default=None,
        help="store the matmul weights quantised (as --mode's weight modes do at load): an orbax checkpoint "
        "(--format is orbax) that loads without re-quantising",
    )
    parser.add_argument(
        "--calibration", default=None, metavar="TEXT",
        help="calibrate --quant w4a16 (--recipe) or w8a8 (SmoothQuant) on this text: 'pydoc' (CPython's "
        "pydoc_data.topics, shipped with Python) or a UTF-8 text file; default: round to nearest",
    )
    parser.add_argument(
        "--recipe", choices=W4A16_RECIPES, default=None,
        help="w4a16's calibration (with --calibration): awq (the default, the best measured on SmolLM2: "
        "activation-aware per-input scales folded into the RMSNorms, gate_up and (for o_proj) v, a per-group "
        "clipping search and a least-squares fit of each group's scale, all on the output error) or gptq (GPTQ's error "
        "compensation, no act-order); docs/perf.md compares them",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing model directory at --dst")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tools.convert.convert import convert

    try:
        dst = convert(args.src, args.dst, dtype=args.dtype, fmt=args.format, tp=args.tp, force=args.force,
                      quant=args.quant, calibration=args.calibration, recipe=args.recipe)
    except ConvertError as err:
        print(f"tools.convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
