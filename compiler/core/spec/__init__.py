"""The spec language (docs/spec.md): a strict, typed YAML document naming the passes to run.

- ``schema``: the typed, frozen model of a loaded spec (``Spec``, ``PassEntry``, ...);
- ``located_yaml``: YAML parsed keeping every key's file and line;
- ``load``: YAML -> ``Spec`` (``extends``, validation, each pass's options typed by its
  config class through an injected lookup), errors as ``SpecError`` with file:line key.path;
- ``emit``: a ``Spec`` back to YAML that loads to an equal spec.

The names most callers need are importable from here.
"""

from kiln.compiler.core.spec.emit import dump_spec
from kiln.compiler.core.spec.load import (
                                          ConfigLookup,
                                          builtin_specs,
                                          default_spec,
                                          load_spec,
                                          spec_from_data,
                                          spec_from_text,
)
from kiln.compiler.core.spec.located_yaml import KeyPath, Locations, format_path
from kiln.compiler.core.spec.schema import (
                                          COMMON_PASS_KEYS,
                                          SPEC_VERSION,
                                          Budget,
                                          Calibration,
                                          Output,
                                          ParamCondition,
                                          PassEntry,
                                          Preprocess,
                                          Selector,
                                          SelectorBase,
                                          Spec,
                                          Tune,
                                          Verify,
)

__all__ = ["COMMON_PASS_KEYS", "SPEC_VERSION", "Budget", "Calibration", "ConfigLookup",
           "KeyPath", "Locations", "Output", "ParamCondition", "PassEntry", "Preprocess",
           "Selector", "SelectorBase", "Spec", "Tune", "Verify", "builtin_specs",
           "default_spec", "dump_spec", "format_path", "load_spec", "spec_from_data",
           "spec_from_text"]
