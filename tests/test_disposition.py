"""``Content-Disposition`` file names (service/http/disposition.py): right, and read in linear time.

``email.message`` took ~122 ms of event-loop time for a header of 15,000 ``;`` (issue 24): its work
grew with the square of the parameters. The work is measured here as the number of Python lines the
parse executes (``sys.settrace``), all frames included, so a library doing the work in Python is
counted too: no wall clock, nothing that a loaded machine can flake.
"""

from __future__ import annotations

import sys
from email.message import Message
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.http.disposition import MAX_PARAMETERS, filename, parameters
from service.http.raw_body import DEFAULT_NAME, raw_name

CASES = [
    ('inline; filename="cat.jpg"', "cat.jpg"),
    ("attachment; filename=cat.jpg", "cat.jpg"),
    ("inline;filename=cat.jpg;size=3", "cat.jpg"),
    ('inline; FileName = "a b.png" ; x=1', "a b.png"),
    ('inline; filename="semi;colon.png"', "semi;colon.png"),
    (r'inline; filename="quo\"te\\.png"', 'quo"te\\.png'),
    ("inline; filename*=UTF-8''%e2%82%ac%20rates.png", "€ rates.png"),
    ("inline; filename*=iso-8859-1'en'%A3.png", "£.png"),
    ("inline; filename=\"plain.png\"; filename*=utf-8''%C3%A9t%C3%A9.png", "été.png"),  # RFC 6266 4.3
    ("inline; filename*=utf-8''%C3%A9.png; filename=\"plain.png\"", "é.png"),
    ("inline; filename*=koi8-r''x.png; filename=fallback.png", "fallback.png"),  # unknown charset
    ("inline; filename*=no-quotes.png; filename=fallback.png", "fallback.png"),
    ('inline; filename="never closed.png', "never closed.png"),
    ("inline; filename=", None),
    ('inline; filename=""', None),
    ("inline", None),
    ("inline; name=x", None),
    ("", None),
    (";;;;;filename=late.png", "late.png"),
    ("inline; novalue; filename=b.png", "b.png"),
]


@pytest.mark.parametrize(("header", "expected"), CASES)
def test_filename(header: str, expected: str | None) -> None:
    assert filename(header) == expected


def test_parameters_are_read_in_order_lowercased_and_capped() -> None:
    assert list(parameters('form-data; Name="files"; filename=a.png')) == [("name", "files"), ("filename", "a.png")]
    many = "inline" + "".join(f"; p{i}=v" for i in range(100))
    assert len(list(parameters(many))) == MAX_PARAMETERS


def email_filename(header: str) -> str | None:
    message = Message()
    message["content-disposition"] = header
    return message.get_filename() or None


token = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='";=\\'), min_size=1)
quoted = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'), min_size=1)


@settings(max_examples=300, deadline=None)
@given(
    name=st.one_of(token, quoted),
    quote=st.booleans(),
    before=st.lists(st.tuples(st.sampled_from(["size", "name", "x-y"]), token), max_size=3),
    after=st.lists(st.tuples(st.sampled_from(["size", "name", "x-y"]), token), max_size=3),
)
def test_well_formed_headers_read_as_the_email_package_reads_them(
    name: str, quote: bool, before: list, after: list
) -> None:
    """On what both parse alike (no ``filename*``), the answer is the standard library's."""
    if not quote and any(c in name for c in " \t;\"'()<>@,:/[]?"):
        quote = True
    value = f'"{name}"' if quote else name
    others = [f"{k}={v}" for k, v in before], [f"{k}={v}" for k, v in after]
    header = "; ".join(["inline", *others[0], f"filename={value}", *others[1]])
    assert filename(header) == email_filename(header)


def python_lines(function: Any, *args: Any) -> int:
    """Python lines executed by ``function(*args)``, in every frame it enters."""
    count = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    sys.settrace(lambda frame, event, arg: local)
    try:
        function(*args)
    finally:
        sys.settrace(None)
    return count


HOSTILE = {
    "semicolons": lambda n: "inline; filename=" + ";" * n,  # issue 24's header
    "empty parameters": lambda n: "inline" + "; a=" * (n // 4),
    "escapes": lambda n: 'inline; filename="' + "\\a" * (n // 2) + '"',
    "unclosed quotes": lambda n: "inline" + '; a="x' * (n // 6),
    "equals": lambda n: "inline; " + "=" * n,
}


@pytest.mark.parametrize("shape", list(HOSTILE))
def test_work_does_not_grow_with_hostile_headers(shape: str) -> None:
    """16x the header, the same number of Python steps: the scanning left is C's ``str.find`` and ``re``."""

    def parse(header: str) -> str:
        return raw_name(header)

    small, large = (python_lines(parse, HOSTILE[shape](n)) for n in (1000, 16000))
    assert large <= small + 10, (small, large)
    assert large < 50 * MAX_PARAMETERS


def test_the_raw_body_default_name() -> None:
    assert raw_name(None) == DEFAULT_NAME
    assert raw_name("inline") == DEFAULT_NAME
    assert raw_name("inline; filename=x.png") == "x.png"


@settings(max_examples=300, deadline=None)
@given(name=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), min_size=1, max_size=40))
def test_any_latin1_name_survives_quoting(name: str) -> None:
    """Quoted with every ``"`` and ``\\`` escaped (RFC 9110 quoted-pair), read back as it was."""
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    assert filename(f'attachment; filename="{escaped}"; size=1') == (name.strip() or None)
