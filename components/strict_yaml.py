"""YAML read strictly for experiments: a key given twice is reported, and an override keeps every character.

Plain YAML keeps the last of two equal keys in a mapping, so a second `pretrain:` section
silently drops the whole first one; here each repeat is reported with both lines. And YAML
reads ` #...` as a comment, so `workdir=/tmp/run #2` would become `/tmp/run`; an override's
value is YAML's reading only when YAML reads all of it as the value.
"""
from __future__ import annotations

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *base`: its keys may be replaced, that is what it is for

PARSE_ERRORS = (yaml.YAMLError, ValueError, RecursionError)
"""What parsing may raise on bad text: YAML's own errors, Python's limit on the digits of an
integer (ValueError) and a document nested too deeply (RecursionError)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that records every key given twice in one mapping (`repeated`) instead of dropping the first."""

    def __init__(self, stream):
        super().__init__(stream)
        self.repeated: list[str] = []  # "<dotted key>: given twice, on lines A and B; ..."
        self._names: dict[int, str] = {}  # id of a mapping node -> the dotted prefix of its keys

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self._note_repeated_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _note_repeated_keys(self, node: yaml.MappingNode) -> None:
        prefix = self._names.get(id(node), "")
        first_line: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # a collection as a key is refused by SafeLoader itself
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode):
                self._names[id(value_node)] = f"{prefix}{key}."
            if key in first_line:
                what = "section" if isinstance(value_node, yaml.MappingNode) else "value"
                self.repeated.append(f"{prefix}{key}: given twice, on lines {first_line[key]} and {line}; YAML "
                                     f"would silently keep only the second {what}, so remove one")
            else:
                first_line[key] = line


def parse_document(text: str) -> tuple[object, list[str]]:
    """The YAML document in `text` (None when empty) and every key it gives twice, each named by its dotted key.

    Raises:
        One of PARSE_ERRORS: the text is not valid YAML.
    """
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data(), loader.repeated
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[object, list[str]]:
    """The value of an override `key=text`, and the keys a mapping in it gives twice.

    YAML's reading of `text` (a number, a bool, a list `[a, b]`, a quoted string) when YAML reads
    all of it as one value; otherwise `text` itself, every character kept: YAML would drop
    a ` #...` tail as a comment, and text that is not YAML (`a: b: c`) is meant as a string.
    An empty value is null, as in YAML.
    """
    if not text.strip():
        return None, []
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None or node.end_mark.index < len(text.rstrip()):  # a comment ended the value early
            return text, []
        return loader.construct_document(node), loader.repeated
    except PARSE_ERRORS:
        return text, []
    finally:
        loader.dispose()
