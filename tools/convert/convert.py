"""One conversion, end to end: read the source (HF dir or GGUF), check it fits `--tp`, write the model
directory into a staging folder beside `dst`, then move it into place (a failed run leaves `dst` as it was)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from jaxllm.config import ModelConfig
from jaxllm.parallel import logical_rules, make_mesh
from tools.convert.checkpoint import DTYPES, Checkpoint, ConvertError
from tools.convert.gguf_import import read_gguf
from tools.convert.hf_export import MAX_SHARD_BYTES, write_hf
from tools.convert.hf_import import read_hf

FORMATS = ("hf", "orbax")
SCHEMES = ("w8a16", "w4a16", "w8a8", "fp8_w8a8")  # jaxllm.models.quant.SCHEMES (not imported: no jax here)
CALIBRATED = ("w4a16", "w8a8")  # tools/convert/calibrated.py


def read_source(src: str | Path) -> Checkpoint:
    """An HF model directory or a `.gguf` file, as a lazily read checkpoint."""
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"source {src} does not exist")
    if src.is_dir():
        return read_hf(src)
    if src.suffix.lower() == ".gguf":
        return read_gguf(src)
    raise ConvertError(f"source {src} is neither a Hugging Face model directory nor a .gguf file")


def _check_destination(dst: Path, force: bool) -> None:
    if not dst.exists():
        return
    if not dst.is_dir():
        raise ConvertError(f"destination {dst} exists and is not a directory")
    if any(dst.iterdir()):
        if not force:
            raise ConvertError(f"destination {dst} is not empty (pass --force to replace it)")
        if not (dst / "config.json").is_file():
            raise ConvertError(f"--force replaces only a model directory; {dst} has no config.json")


def _check_tp(checkpoint: Checkpoint, tp: int, fmt: str) -> None:
    try:
        logical_rules(ModelConfig.from_hf_dict(checkpoint.config), tp)
        if fmt == "orbax":
            make_mesh(tp)
    except ValueError as err:
        raise ConvertError(str(err)) from err


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    fmt: str = "hf",
    tp: int = 1,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    quant: str | None = None,
    calibration: str | None = None,
    recipe: str | None = None,
) -> Path:
    """Convert `src` into the model directory `dst`; `dtype=None` keeps the source's (float32 for GGUF).
    `quant` (one of SCHEMES) stores the matmul weights quantised, in an orbax checkpoint; `calibration` (a
    text: `pydoc` or a file, tools/convert/calibration.py) calibrates them (CALIBRATED schemes), w4a16 by
    `recipe` (tools/convert/calibrated.W4A16_RECIPES; default the first)."""
    if calibration is not None and quant not in CALIBRATED:
        raise ConvertError(f"--calibration is built for --quant {' or '.join(CALIBRATED)}, not {quant}")
    if recipe is not None:
        from tools.convert.calibrated import W4A16_RECIPES

        if quant != "w4a16" or calibration is None:
            raise ConvertError("--recipe is for --quant w4a16 with --calibration")
        if recipe not in W4A16_RECIPES:
            raise ConvertError(f"unknown --recipe {recipe!r} (choose {', '.join(W4A16_RECIPES)})")
    if quant is not None:
        if quant not in SCHEMES:
            raise ConvertError(f"unknown quantisation {quant!r} (choose {', '.join(SCHEMES)})")
        fmt = "orbax"
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r} (choose {', '.join(FORMATS)})")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")
    dst = Path(dst).absolute()
    _check_destination(dst, force)
    checkpoint = read_source(src)
    _check_tp(checkpoint, tp, fmt)
    dtype_name = dtype or checkpoint.source_dtype
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would carry over to dst
    try:
        if fmt == "orbax":
            from tools.convert.orbax_export import write_orbax

            write_orbax(staging, checkpoint, dtype_name, tp, quant, calibration, recipe)
        else:
            write_hf(staging, checkpoint, dtype_name, max_shard_bytes)
        _replace(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def _replace(staging: Path, dst: Path) -> None:
    """Move the finished directory into place; an old `dst` goes only once the new one is complete."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        staging.rename(dst)
        shutil.rmtree(old)
    else:
        staging.rename(dst)
