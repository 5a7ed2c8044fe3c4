"""common.manifest_json: each way a manifest can be bad is one named line, and a good one reads back."""

import os

import pytest

from moec.common.errors import MoecError
from moec.common.manifest_json import fields_named, read_manifest_json

FIX = "rebuild it"


def _write(tmp_path, text: str | bytes):
    p = tmp_path / "m.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def test_a_good_manifest_reads_back(tmp_path):
    assert read_manifest_json(_write(tmp_path, '{"format": "f", "n": 1}'), fix=FIX, format="f") == {"format": "f", "n": 1}


@pytest.mark.parametrize("text, needle", [
    ("{broken", "m.json is not valid JSON"),
    (b"\xff\xfe{}", "m.json is not valid JSON"),           # not UTF-8
    ("[" * 100000 + "]" * 100000, "m.json is not valid JSON"),  # nested past Python's parser
    ("[1, 2]", "m.json is not a JSON object"),
    ('{"format": "other"}', "m.json has format 'other', expected 'f'"),
    ("{}", "m.json has format None, expected 'f'"),
])
def test_bad_content_is_named_with_the_fix(tmp_path, text, needle):
    with pytest.raises(MoecError, match=needle) as e:
        read_manifest_json(_write(tmp_path, text), fix=FIX, format="f")
    assert str(e.value).endswith(FIX) and "\n" not in str(e.value)


def test_callers_messages_replace_the_defaults(tmp_path):
    with pytest.raises(MoecError, match="^no manifest here$"):
        read_manifest_json(tmp_path / "absent.json", fix=FIX, missing="no manifest here")
    with pytest.raises(MoecError, match="absent.json is missing; rebuild it"):
        read_manifest_json(tmp_path / "absent.json", fix=FIX)
    with pytest.raises(MoecError, match="^not ours$"):
        read_manifest_json(_write(tmp_path, '{"format": "x"}'), fix=FIX, format="f", not_this="not ours")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_named(tmp_path):
    p = _write(tmp_path, "{}")
    p.chmod(0)
    with pytest.raises(MoecError, match="cannot read .*m.json"):
        read_manifest_json(p, fix=FIX)


@pytest.mark.parametrize("bad", [lambda d: d["absent"], lambda d: d["n"] + "x", lambda d: d["l"][5], lambda d: int("x")])
def test_fields_named_turns_a_field_error_into_one_line(tmp_path, bad):
    data = {"n": 1, "l": []}
    with pytest.raises(MoecError, match=r"m.json \(extra\) lacks or mistypes a field .*; rebuild it$"):
        with fields_named(tmp_path / "m.json", FIX, " (extra)"):
            bad(data)


def test_fields_named_lets_moec_errors_and_bugs_of_other_kinds_through(tmp_path):
    with pytest.raises(MoecError, match="^as raised$"):
        with fields_named(tmp_path / "m.json", FIX):
            raise MoecError("as raised")
    with pytest.raises(ZeroDivisionError):
        with fields_named(tmp_path / "m.json", FIX):
            1 / 0
