"""The flag set against LightLLM's seed document: names, defaults, choices; start-up checks; refusals."""

import re
from pathlib import Path

import pytest

from jaxllm.args import build_parser, parse_args

# A copy of ../shared/seed/api_server_args.rst (LightLLM docs at b3d4f1de), the document the flags come from.
SEED = Path(__file__).resolve().parent / "assets" / "api_server_args.rst"


def seed_flags() -> dict[str, str | None]:
    """flag name → the default the seed document states (None where it states none)."""
    text = SEED.read_text()
    flags = {}
    for block in re.split(r"\n:code:`", text)[1:]:
        name = block[: block.index("`")].lstrip("-")
        m = re.search(r"Default\s*:\s*(.+)", block)
        flags[name] = m.group(1).strip() if m else None
    return flags


def test_seed_document_is_found_and_complete():
    assert len(seed_flags()) == 40


@pytest.mark.parametrize("name,stated", sorted(seed_flags().items()))
def test_every_seed_flag_exists_with_its_default(name, stated):
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    assert name in actions, f"--{name} missing"
    default = actions[name].default
    if stated is None:
        assert default is None
        return
    expected = stated.strip("“”\"")
    if expected in ("False", "True"):
        assert default is (expected == "True")
    elif expected == "2048 + 1024":
        assert default == 3072
    elif expected == "[2]":
        assert default == [2]
    elif expected == "[]":
        assert default == []
    elif expected == "None":
        assert default is None
    else:
        assert str(default) == expected


def test_types_nargs_and_choices_match_lightllm():
    actions = {a.dest: a for a in build_parser()._actions}
    assert actions["eos_id"].nargs == "+" and actions["eos_id"].type is int
    assert actions["mode"].nargs == "+"
    assert actions["data_type"].choices == ["fp16", "float16", "bf16", "bfloat16", "fp32", "float32"]
    assert actions["long_truncation_mode"].choices == [None, "head", "center"]
    assert actions["router_token_ratio"].type is float
    assert actions["splitfuse_mode"].const is True  # store_true


def test_parsed_values_and_resolved_batch_max_tokens():
    args = parse_args(["--eos_id", "2", "7", "--long_truncation_mode", "None", "--grouping_key", "a=b"])
    assert args.eos_id == [2, 7]
    assert args.long_truncation_mode is None
    assert args.grouping_key == ["a=b"]
    assert args.batch_max_tokens == max(6000 // 6, 3072)
    assert parse_args(["--long_truncation_mode", "center"]).long_truncation_mode == "center"


@pytest.mark.parametrize(
    "argv,reason",
    [
        (["--max_req_input_len", "4000"], "max_req_input_len"),
        (["--max_total_token_num", "1000"], "max_total_token_num"),
        (["--batch_max_tokens", "100"], "batch_max_tokens"),
        (["--grouping_key", "novalue"], "grouping_key"),
        (["--splitfuse_block_size", "0"], "splitfuse_block_size"),
        (["--running_max_req_size", "0"], "running_max_req_size"),
        (["--cache_capacity", "0"], "cache_capacity"),
        (["--cache_reserved_ratio", "1.5"], "cache_reserved_ratio"),
    ],
)
def test_startup_checks_fail_with_a_reason(argv, reason):
    with pytest.raises(ValueError, match=reason):
        parse_args(argv)


def test_help_lists_every_seed_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for name in seed_flags():
        assert f"--{name}" in out


def test_api_keys_are_repeatable_and_kept_out_of_reprs(capsys):
    assert parse_args([]).api_key == []
    args = parse_args(["--api_key", "k-1", "--api_key=k-2"])
    assert args.api_key == ["k-1", "k-2"] and "k-1" not in repr(args) and "api_key" not in repr(args)
    for bad in ("", "two words", "tab\tkey", "ключ"):
        with pytest.raises(ValueError, match="--api_key number 2") as err:
            parse_args(["--api_key", "fine", "--api_key", bad])
        assert bad not in str(err.value) or not bad
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "--api_key KEY" in capsys.readouterr().out.replace("\n", " ")


def test_router_max_wait_tokens_takes_zero_as_lightllm_does():
    assert parse_args(["--router_max_wait_tokens", "0"]).router_max_wait_tokens == 0  # new requests tried every step
    with pytest.raises(ValueError, match="--router_max_wait_tokens must be at least 0"):
        parse_args(["--router_max_wait_tokens", "-1"])
