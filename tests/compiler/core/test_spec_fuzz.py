"""Fuzzing the spec loader: any text or any YAML document either loads or raises
SpecError (never another exception, so the CLI never shows a traceback); whatever loads
writes back out to YAML that loads to the same spec."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.compiler.core.errors import SpecError
from kiln.compiler.core.spec import Spec, dump_spec
from kiln.compiler.core.spec.emit import spec_document
from kiln.compiler.driver.compile import build_steps
from kiln.compiler.driver.specs import load_spec, spec_from_text

# KILN_FUZZ_EXAMPLES=5000 for a longer hunt (3000 ran clean in about two minutes).
EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# Keys the loader knows (so generated documents get past the first unknown key).
KNOWN_KEYS = ["kiln", "name", "extends", "description", "inputs", "calibration", "passes",
              "verify", "target", "tune", "output", "fold_batchnorm", "dedupe_weights",
              "select", "optional", "budget", "op", "name", "module", "param", "exclude",
              "min_elements", "ndim", "sqnr_db", "max_abs_err", "samples", "seed", "source",
              "mul_add", "on_budget_exceeded", "report", "x", "1"]

YAML_TOKENS = ["kiln: 1\n", "kiln:", " 1", "\n", "  ", "- ", ": ", "{", "}", "[", "]", ",",
               "passes:\n", "  - fold_batchnorm:", "  - dedupe_weights: {}\n", "select:",
               "op: Conv", "name: 're:(a'", "'", '"', "&a ", "*a", "!!binary ", "!!python/name:os",
               "<<: ", "? ", "|\n", ">\n", "#", "---\n", "...\n", "~", "null", "true", ".inf",
               "2024-01-01", "0x1F", "-1", "1e3", "\t", "%YAML 1.1\n", "!tag ", "extends: fp32\n",
               "extends: reparam\n", "optional: true", "budget: {sqnr_db: 1}", "\\", "\x00",
               "é", "inputs: {x: [1, 3]}\n", "verify: {samples: 0}\n"]


def _load_text(text: str) -> None:
    try:
        spec = spec_from_text(text, file="fuzz.yaml")
    except SpecError as error:
        _check_message(error)
        return
    assert isinstance(spec, Spec)
    _check_round_trip(spec)
    build_steps(spec)   # pass options were typed at load: every pass resolves


def _check_round_trip(spec: Spec) -> None:
    """Emitted and loaded again, the spec writes out the same (text, so NaN compares)."""
    again = spec_from_text(dump_spec(spec), file=spec.source or "<spec>")
    assert yaml.safe_dump(spec_document(again)) == yaml.safe_dump(spec_document(spec))


def _check_message(error: SpecError) -> None:
    text = str(error)
    assert text and len(text.splitlines()) <= 2, text
    assert "Traceback" not in text


yaml_ish = st.lists(st.sampled_from(YAML_TOKENS) | st.text(max_size=6), max_size=30).map("".join)


@FUZZ
@given(yaml_ish)
def test_yaml_ish_text_loads_or_raises_spec_error(text: str) -> None:
    _load_text(text)


@FUZZ
@given(st.text(max_size=200))
def test_arbitrary_text_loads_or_raises_spec_error(text: str) -> None:
    _load_text(text)


scalars = (st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=8) | st.sampled_from(KNOWN_KEYS + ["Conv", "re:[", "*", "fp32"]))
keys = st.sampled_from(KNOWN_KEYS) | st.text(max_size=5) | st.integers(0, 3) | st.booleans()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(keys, inner, max_size=4), max_leaves=25)
documents = st.dictionaries(keys, values, max_size=6)
TOP_KEYS = ["name", "extends", "description", "inputs", "calibration", "passes", "verify",
            "target", "tune", "output"]


@FUZZ
@given(st.dictionaries(st.sampled_from(TOP_KEYS), values, min_size=1, max_size=4))
def test_known_top_level_keys_with_any_values(document: dict) -> None:
    _load_text(yaml.safe_dump({"kiln": 1, **document}, allow_unicode=True))


@FUZZ
@given(documents, st.booleans())
def test_nested_mappings_dumped_to_yaml(document: dict, with_version: bool) -> None:
    if with_version:
        document = {"kiln": 1, **document}
    _load_text(yaml.safe_dump(document, allow_unicode=True))


pass_items = st.one_of(
    st.sampled_from(["fold_batchnorm", "dedupe_weights", "fold_batchnorn"]),
    st.dictionaries(st.sampled_from(["fold_batchnorm", "dedupe_weights", "nope"]),
                    st.none() | st.dictionaries(keys, values, max_size=4), min_size=1,
                    max_size=2),
    values)


@FUZZ
@given(st.lists(pass_items, max_size=4), st.dictionaries(keys, values, max_size=3))
def test_pass_lists(passes: list, extra: dict) -> None:
    document = {**extra, "kiln": 1, "passes": passes}
    _load_text(yaml.safe_dump(document, allow_unicode=True))


_counter = itertools.count()


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_specs")


@FUZZ
@given(parent=st.one_of(st.none(), documents, yaml_ish), child=st.one_of(documents, yaml_ish),
       parent_ref=st.sampled_from(["parent.yaml", "child.yaml", "fp32", "nope", "reparam"]))
def test_load_spec_files_with_extends(spec_dir: Path, parent, child, parent_ref: str) -> None:
    folder = spec_dir / f"case{next(_counter)}"
    folder.mkdir()
    if parent is not None:
        text = parent if isinstance(parent, str) else yaml.safe_dump({"kiln": 1, **parent})
        (folder / "parent.yaml").write_text(text, encoding="utf-8")
    if isinstance(child, dict):
        child = yaml.safe_dump({"kiln": 1, **child, "extends": parent_ref})
    path = folder / "child.yaml"
    path.write_text(child, encoding="utf-8")
    try:
        spec = load_spec(path)
    except SpecError as error:
        _check_message(error)
        return
    _check_round_trip(spec)
    build_steps(spec)
