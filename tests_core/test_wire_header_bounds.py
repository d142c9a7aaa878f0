"""The request header is untrusted: every pathological JSON value is a ProtocolError, never anything else."""

import pytest

from djinn_core.errors import ProtocolError
from djinn_core.rpc.wire import MAX_HEADER_DEPTH, decode_header

pytestmark = pytest.mark.cpu

PATHOLOGICAL = {
    "int of 5000 digits": b'{"v":1,"id":' + b"9" * 5000 + b"}",
    "int past 64 bits": b'{"v":1,"id":9223372036854775808}',
    "deep arrays": b'{"v":1,"a":' + b"[" * 20000 + b"]" * 20000 + b"}",
    "deep objects": b'{"v":1,"a":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    "NaN": b'{"v":NaN}',
    "Infinity": b'{"v":1,"x":-Infinity}',
    "float overflow": b'{"v":1,"x":1e999}',
    "long float": b'{"v":1,"x":1.' + b"1" * 100 + b"}",
    "not UTF-8": b"\xff\xfe{}",
    "not an object": b"[1]",
    "truncated": b'{"v":1,"id":',
    "empty": b"",
}


@pytest.mark.parametrize("raw", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_pathological_header_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_header(raw, max_header_bytes=1 << 20)


def test_depth_bound_counts_brackets_outside_strings_only() -> None:
    brackets_in_a_string = b'{"v":1,"s":"' + b"[" * 100 + b'"}'
    assert decode_header(brackets_in_a_string)["s"] == "[" * 100
    nested = b'{"v":1,"a":' + b"[" * (MAX_HEADER_DEPTH - 1) + b"]" * (MAX_HEADER_DEPTH - 1) + b"}"
    decode_header(nested)
    with pytest.raises(ProtocolError, match="nests deeper"):
        decode_header(b'{"v":1,"a":' + b"[" * MAX_HEADER_DEPTH + b"]" * MAX_HEADER_DEPTH + b"}")


def test_ordinary_numbers_survive() -> None:
    h = decode_header(b'{"v":1,"id":9223372036854775807,"n":-5,"x":0.25,"e":1e-3}')
    assert h["id"] == 2**63 - 1 and h["n"] == -5 and h["x"] == 0.25 and h["e"] == 1e-3
