"""Every example config under configs/ parses and validates (paths are placeholders)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from starmerge.config import parse_config
from starmerge.sweep.config import sweep_from_dict

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_is_valid(path):
    raw = yaml.safe_load(path.read_text())
    if "suite" in raw:
        sweep = sweep_from_dict(raw)
        assert sweep.jobs
        if raw.get("data"):  # a `data:` section reaches the data-driven jobs
            assert any(job.data is not None for job in sweep.jobs)
    else:
        assert parse_config(raw).method == raw["method"]


def test_there_are_examples():
    assert len(CONFIGS) >= 5
