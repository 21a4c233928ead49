"""Every option of every method config is documented in the options table of the class it builds: a heading in
docs/methods/*.md with "Options" and the class name in backticks, then a table whose first column names the options."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ltlib.config import config_dir

REPO = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (Path(config_dir()) / "method").glob("*.yaml"))


def options_table(target: str) -> tuple[Path, list[str]]:
    """The doc holding the options table of class ``target`` (a heading with "Options" and `target`) and the
    backticked names in the first column of that table."""
    for doc in sorted((REPO / "docs" / "methods").glob("*.md")):
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("#") and "Options" in line and f"`{target}`" in line:
                rows = []
                for row in lines[i + 1:]:
                    if row.startswith("#"):
                        break
                    if row.startswith("| `"):
                        rows.append(row.split("|")[1])
                return doc, [name for cell in rows for name in re.findall(r"`([a-z_0-9]+)`", cell)]
    raise AssertionError(f"no docs/methods/*.md heading names the options of `{target}`")


def method_options(method: str) -> tuple[str, set[str]]:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={method}"])
    options = OmegaConf.to_container(cfg.method, resolve=False)
    target = options.pop("_target_").rsplit(".", 1)[-1]
    options.pop("_partial_", None)
    return target, set(options)


@pytest.mark.parametrize("method", METHODS)
def test_every_option_of_the_method_config_is_in_its_docs_table(method):
    target, options = method_options(method)
    doc, documented = options_table(target)
    missing = options - set(documented)
    assert not missing, f"{doc.name} (options of {target}) does not document {sorted(missing)} of method={method}"


def test_the_table_reader_finds_a_known_table():
    doc, documented = options_table("BBN")
    assert doc.name == "bbn.md" and {"rebalancing_sampler", "combiner", "adaptor", "trunk_pass"} <= set(documented)
    with pytest.raises(AssertionError, match="no docs/methods"):
        options_table("NoSuchMethod")
