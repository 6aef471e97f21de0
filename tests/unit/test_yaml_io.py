"""The one YAML loader: what plain SafeLoader accepts silently or crashes on is refused by name."""

from __future__ import annotations

import sys
import time

import pytest
import yaml

from starmerge.errors import ConfigError
from starmerge.yaml_io import MAX_DEPTH, MAX_NODES, load_yaml, parse_yaml


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "config file c.yaml")
    return str(info.value)


def test_plain_documents_parse_as_safe_load_does():
    text = "a: 1\nb: [x, 2.5, null, true]\nc: {d: &v e, f: *v}\nd: 2024-01-01\n"
    assert parse_yaml(text, "x") == yaml.safe_load(text)
    assert parse_yaml("", "x") is None


def test_depth_at_the_bound_passes_and_beyond_is_refused():
    assert parse_yaml("[" * MAX_DEPTH + "]" * MAX_DEPTH, "x") is not None
    message = _error("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert message.startswith(f"config file c.yaml nests values deeper than {MAX_DEPTH} levels")


def test_depth_far_beyond_the_recursion_limit_is_refused_not_crashed():
    n = 20 * sys.getrecursionlimit()
    assert "deeper than" in _error("a: " + "[" * n + "]" * n)
    block = "".join(" " * i + f"k{i}:\n" for i in range(n // 10))
    assert "deeper than" in _error(block)


def test_depth_built_from_aliases_is_counted_expanded():
    half = MAX_DEPTH // 2 + 5
    text = f"a: &a {'[' * half}x{']' * half}\nb: {'[' * half}*a{']' * half}\n"
    assert "deeper than" in _error(text)


def test_size_counts_alias_reuse_and_stays_fast():
    ok = "a: &a [" + ", ".join(["x"] * 99) + "]\nb: [" + ", ".join(["*a"] * 99) + "]\n"
    assert len(parse_yaml(ok, "x")["b"]) == 99  # 99 * 100 values: under the bound
    bomb = (
        "l0: &l0 ["
        + ", ".join(["x"] * 9)
        + "]\n"
        + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))
    )
    start = time.perf_counter()
    message = _error(bomb)
    assert time.perf_counter() - start < 1.0
    assert f"expands to more than {MAX_NODES} values" in message


def test_duplicate_keys_name_both_lines_in_nested_mappings():
    message = _error("top:\n  a: 1\n  b: 2\n  a: 3\n")
    assert message == "duplicate key 'a' at lines 2 and 4 of config file c.yaml; keep one"
    assert "lines 1 and 1" in _error("{1: a, 0x1: b}")  # the same key written two ways


def test_tags_outside_plain_data_are_refused():
    assert "'!!python/object/apply:os.system' at line 2" in _error(
        "a: 1\nb: !!python/object/apply:os.system [ls]\n"
    )
    assert "'!custom' at line 1" in _error("a: !custom 1\n")
    assert parse_yaml("a: !!str 1\n", "x") == {"a": "1"}


def test_control_character_and_syntax_errors_are_one_line():
    assert _error("a: \x07\n").startswith("config file c.yaml holds the control character #x0007")
    message = _error("a: [1\nb: 2\n")
    assert "is not valid YAML at line" in message and "\n" not in message


def test_load_yaml_file_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"a: 1\nb: \xff\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xff at offset 8\)"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="sweep file .* is a directory"):
        load_yaml(tmp_path, what="sweep file")
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "absent.yaml")
