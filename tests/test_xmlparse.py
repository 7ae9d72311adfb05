"""The hardened XML layer: Weixin's documents parse to dicts; DTDs, entities, PIs and garbage are refused."""
from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from webhook.errors import WebhookError, XMLError
from webhook.xmlparse import build_xml, parse_xml

# The user_get_card sample of the protocol page, as pushed.
SAMPLE = """<xml><ToUserName><![CDATA[gh_fc0a06a20993]]></ToUserName>
<FromUserName><![CDATA[oZI8Fj040-be6rlDohc6gkoPOQTQ]]></FromUserName>
<CreateTime>1472551036</CreateTime><MsgType><![CDATA[event]]></MsgType>
<Event><![CDATA[user_get_card]]></Event><CardId><![CDATA[pZI8Fjwsy5fVPRBeD78J4RmqVvBc]]></CardId>
<IsGiveByFriend>0</IsGiveByFriend><UserCardCode><![CDATA[226009850808]]></UserCardCode>
<FriendUserName><![CDATA[]]></FriendUserName><OuterId>0</OuterId>
<OldUserCardCode><![CDATA[]]></OldUserCardCode><OuterStr><![CDATA[12b]]></OuterStr>
<IsRestoreMemberCard>0</IsRestoreMemberCard><IsRecommendByFriend>0</IsRecommendByFriend></xml>""".encode()


def test_parses_the_protocol_sample() -> None:
    """CDATA is unwrapped, numbers stay text, empty CDATA is "", order and names are kept."""
    assert parse_xml(SAMPLE) == {
        "ToUserName": "gh_fc0a06a20993",
        "FromUserName": "oZI8Fj040-be6rlDohc6gkoPOQTQ",
        "CreateTime": "1472551036",
        "MsgType": "event",
        "Event": "user_get_card",
        "CardId": "pZI8Fjwsy5fVPRBeD78J4RmqVvBc",
        "IsGiveByFriend": "0",
        "UserCardCode": "226009850808",
        "FriendUserName": "",
        "OuterId": "0",
        "OldUserCardCode": "",
        "OuterStr": "12b",
        "IsRestoreMemberCard": "0",
        "IsRecommendByFriend": "0",
    }


def test_text_is_stripped_of_xml_whitespace_only() -> None:
    """Indentation and newlines go; an ideographic space (U+3000) is content and stays."""
    body = "<xml>\n  <A>\n  x y \t</A>\n  <B><![CDATA[ \n z ]]></B><C>\u3000w</C><D/><E></E><F>  </F>\n</xml>"
    assert parse_xml(body.encode()) == {"A": "x y", "B": "z", "C": "\u3000w", "D": "", "E": "", "F": ""}


def test_nested_and_repeated_elements() -> None:
    """Nested elements become dicts; a repeated tag becomes a list in document order."""
    body = (
        b"<xml><P><Count>2</Count><L><item><U>a</U></item><item><U>b</U></item><item>c</item></L></P>"
        b"<R>1</R><R>2</R></xml>"
    )
    assert parse_xml(body) == {
        "P": {"Count": "2", "L": {"item": [{"U": "a"}, {"U": "b"}, "c"]}},
        "R": ["1", "2"],
    }


def test_predefined_and_character_references_are_decoded() -> None:
    """The five predefined entities and numeric references are plain XML, not DTD entities."""
    assert parse_xml(b"<xml><A>&lt;&amp;&gt;&quot;&apos;&#20013;&#x6587;</A></xml>") == {"A": "<&>\"'中文"}


def test_declaration_bom_and_comments_are_accepted() -> None:
    """An XML declaration, a UTF-8 BOM and comments are harmless and ignored."""
    body = b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?><!-- hi --><xml><A>1<!-- x -->2</A></xml>'
    assert parse_xml(body) == {"A": "12"}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   \n",
        b"hello",
        b'{"ToUserName": "gh_x"}',
        b"<xml><A>1</A>",  # unclosed
        b"<xml><A>1</B></xml>",
        b"<xml><A>1</A></xml><xml/>",  # two roots
        b"<xml><A>&undefined;</A></xml>",
        b"<xml><A>\x00</A></xml>",
    ],
)
def test_rejects_non_xml(body: bytes) -> None:
    """Empty, non-XML or not well-formed bodies raise XMLError."""
    with pytest.raises(XMLError):
        parse_xml(body)


@pytest.mark.parametrize(
    "body",
    [
        b"<xml><A>\xe9t\xe9</A></xml>",  # latin-1
        b"<xml><A>\xff\xfe</A></xml>",
        '<?xml version="1.0" encoding="GBK"?><xml><A>中文</A></xml>'.encode("gbk"),
        '<?xml version="1.0" encoding="UTF-16"?><xml><A>x</A></xml>'.encode("utf-16"),
    ],
)
def test_rejects_anything_but_utf8(body: bytes) -> None:
    """Only UTF-8 is accepted, whatever the document declares."""
    with pytest.raises(XMLError):
        parse_xml(body)


@pytest.mark.parametrize("root", [b"<foo><A>1</A></foo>", b"<XML><A>1</A></XML>", b'<xml xmlns="urn:x"><A>1</A></xml>'])
def test_rejects_another_root(root: bytes) -> None:
    """The root element must be exactly <xml> (no namespace)."""
    with pytest.raises(XMLError, match="root"):
        parse_xml(root)


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE xml [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<xml><Content>&lol9;</Content></xml>"""


def test_rejects_billion_laughs_without_expanding() -> None:
    """An entity bomb is refused quickly (libxml2's amplification limit or our DOCTYPE ban, whichever first)."""
    started = time.perf_counter()
    with pytest.raises(XMLError):
        parse_xml(BILLION_LAUGHS)
    assert time.perf_counter() - started < 0.5


def test_rejects_a_small_entity_declaration() -> None:
    """An entity that libxml2 would happily parse is still refused, by the DOCTYPE ban."""
    with pytest.raises(XMLError, match="doctype"):
        parse_xml(b'<!DOCTYPE xml [<!ENTITY e "injected">]><xml><Content>&e;</Content></xml>')


@pytest.mark.parametrize(
    "body",
    [
        b'<!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><xml><Content>&xxe;</Content></xml>',
        b'<!DOCTYPE xml [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><xml><Content>x</Content></xml>',
        b'<!DOCTYPE xml SYSTEM "file:///etc/passwd"><xml><Content>x</Content></xml>',
        b'<!DOCTYPE xml SYSTEM "http://127.0.0.1:9/evil.dtd"><xml><Content>x</Content></xml>',
        b"<!DOCTYPE xml><xml><Content>x</Content></xml>",
    ],
)
def test_rejects_any_doctype_and_never_reads_files(body: bytes) -> None:
    """Any DOCTYPE (internal subset, external entity, external DTD) is XMLError; /etc/passwd never leaks."""
    with pytest.raises(XMLError) as caught:
        parse_xml(body)
    assert "root:" not in str(caught.value)
    assert caught.value.reason in ("doctype not allowed", "not well-formed xml")


@pytest.mark.parametrize(
    "body",
    [
        b'<?xml-stylesheet type="text/xsl" href="file:///etc/passwd"?><xml><A>1</A></xml>',
        b"<xml><A>1</A></xml><?evil?>",
        b"<xml><?php system('id') ?><A>1</A></xml>",
        b"<xml><A><B>1</B><?pi x?></A></xml>",
    ],
)
def test_rejects_processing_instructions(body: bytes) -> None:
    """Processing instructions anywhere (before, after, inside the root) are refused."""
    with pytest.raises(XMLError, match="processing instruction"):
        parse_xml(body)


def test_build_xml_writes_weixin_style() -> None:
    """Text as CDATA, ints bare, flags as 0/1, nested mappings, repeated lists; no XML declaration."""
    body = build_xml({"ToUserName": "gh_x", "CreateTime": 12, "Flag": True, "P": {"L": ["a", 1]}, "E": "", "N": None})
    assert body == (
        b"<xml><ToUserName><![CDATA[gh_x]]></ToUserName><CreateTime>12</CreateTime><Flag>1</Flag>"
        b"<P><L><![CDATA[a]]></L><L>1</L></P><E><![CDATA[]]></E><N/></xml>"
    )


def test_build_xml_handles_cdata_terminator() -> None:
    """A value containing "]]>" cannot be CDATA; it is escaped and reads back unchanged."""
    assert parse_xml(build_xml({"A": "x]]>y<&"})) == {"A": "x]]>y<&"}


def test_build_xml_refuses_unknown_types() -> None:
    """Floats and other objects are a programming error, not silently str()-ed."""
    with pytest.raises(TypeError):
        build_xml({"Fee": 1.5})


# Characters XML 1.0 can carry; "\r" is excluded because XML normalises it to "\n".
XML_TEXT = st.text(
    st.one_of(
        st.characters(min_codepoint=0x20, exclude_characters="\ufffe\uffff", exclude_categories=("Cs",)),
        st.sampled_from("\t\n"),
    ),
    max_size=20,
)
_NAME_START = "ABCDEFGHIJKLMNOPQRSTUVWabcdefghijklmnopqrstuvw_"  # no X/x: names starting "xml" are reserved
TAGS = st.builds(str.__add__, st.sampled_from(_NAME_START), st.text(_NAME_START + "XYZxyz0123456789", max_size=10))
VALUES = st.recursive(
    st.one_of(XML_TEXT, st.integers(min_value=-(2**63), max_value=2**63)),
    lambda inner: st.dictionaries(TAGS, inner, min_size=1, max_size=4),
    max_leaves=12,
)


def expected(value: Any) -> Any:
    """What parse_xml returns for a value given to build_xml."""
    if isinstance(value, dict):
        return {key: expected(item) for key, item in value.items()}
    return str(value).strip(" \t\n")


@settings(max_examples=150, deadline=None)
@given(fields=st.dictionaries(TAGS, VALUES, max_size=8))
def test_build_then_parse_round_trip(fields: dict[str, Any]) -> None:
    """parse_xml(build_xml(d)) gives d back with values as stripped text, for any text and nesting."""
    assert parse_xml(build_xml(fields)) == expected(fields)


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda b: b"<xml>" + b + b"</xml>", st.binary(max_size=200)),
        st.builds(lambda t: f"<xml>{t}</xml>".encode(), st.text(alphabet="<>/![]&;?-CDATxml =\"'A", max_size=60)),
    )
)
def test_fuzz_only_raises_xml_error(body: bytes) -> None:
    """Random bytes and near-XML never escape as anything but XMLError (or parse to a dict)."""
    try:
        assert isinstance(parse_xml(body), dict)
    except XMLError:
        pass
    except WebhookError as exc:  # pragma: no cover - would be a wrong error type
        pytest.fail(f"unexpected {type(exc).__name__}")
