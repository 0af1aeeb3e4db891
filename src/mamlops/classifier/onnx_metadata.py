"""An ONNX file's ``metadata_props`` read straight from its bytes, without loading the model.

Why: the teaching store lists classifiers from a small ``info.json`` beside each model, a
cache that must agree with the model it describes (a hand-edited label there changed what
``GET /classifiers`` showed while predict used the model's own labels). Checking it through
onnxruntime means a session per classifier listed; the ``onnx`` package is not a serving
dependency. ``metadata_props`` is a top-level field of the ``ModelProto`` message, so a walk
over the top-level fields finds it and jumps over the graph (the weights) in one step.

    >>> read_metadata(Path("classifiers/0123456789abcdef/model.onnx").read_bytes())["labels"]
    '["a", "b"]'
"""

from __future__ import annotations

from collections.abc import Iterator

METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {key=1, value=2}


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``metadata_props`` of the serialized ONNX model ``data`` as a dict. A ValueError for
    bytes that are not a protobuf message (random bytes, a truncated file)."""
    meta = {}
    for number, start, end in _fields(data, 0, len(data)):
        if number == METADATA_PROPS:
            entry = {
                n: data[a:b].decode("utf-8", "replace") for n, a, b in _fields(data, start, end)
            }
            meta[entry.get(1, "")] = entry.get(2, "")
    return meta


def _fields(data: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in
    ``data[pos:end]``; numbers and fixed-size fields are stepped over."""
    while pos < end:
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > end:
                raise ValueError("not an ONNX model: a field runs past the end")
            yield key >> 3, pos, pos + size
            pos += size
        else:
            raise ValueError(f"not an ONNX model: protobuf wire type {wire}")
    if pos != end:
        raise ValueError("not an ONNX model: the last field runs past the end")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("not an ONNX model: a bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
