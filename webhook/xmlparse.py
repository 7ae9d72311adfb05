"""Hardened XML in and out: Weixin's flat `<xml>` documents as dicts, and back."""
from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from lxml import etree

from webhook.errors import XMLError

ROOT_TAG = "xml"
_XML_SPACE = " \t\r\n"  # only XML's own whitespace: U+3000 and friends are content

_local = threading.local()


def _parser() -> etree.XMLParser:
    """This thread's parser: lxml parsers keep state and must not be shared across threads."""
    parser: etree.XMLParser | None = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = etree.XMLParser(
            resolve_entities=False,  # an entity reference stays a node, never file or URL contents
            no_network=True,
            load_dtd=False,
            dtd_validation=False,
            huge_tree=False,  # keep libxml2's depth and size limits
            remove_comments=True,
            remove_pis=False,  # kept so that we can reject them
            collect_ids=False,
            # Weixin sends UTF-8 only; forcing it makes an encoding declaration
            # powerless and turns any other byte soup into a syntax error.
            encoding="utf-8",
        )
    return parser


def _children(element: Any) -> dict[str, Any]:
    """Element children as tag -> text | nested dict | list of repeats."""
    result: dict[str, Any] = {}
    for child in element:
        tag = child.tag
        # Comments were dropped at parse time, so anything that is not an element
        # here is a processing instruction or an entity reference.
        if type(tag) is not str:
            raise XMLError("processing instruction or entity in xml")
        if len(child):
            value: Any = _children(child)
        else:
            text = child.text
            value = text.strip(_XML_SPACE) if text else ""
        previous = result.get(tag, _MISSING)
        if previous is _MISSING:
            result[tag] = value
        elif type(previous) is list:  # lists only ever come from repeats
            previous.append(value)
        else:
            result[tag] = [previous, value]
    return result


_MISSING: Any = object()


def parse_xml(body: bytes) -> dict[str, Any]:
    """Parse a Weixin `<xml>` document into a dict; XMLError for anything unsafe or malformed."""
    if not body or not body.strip():
        raise XMLError("empty body")
    try:
        root = etree.fromstring(body, _parser())
    except (etree.LxmlError, ValueError):
        # The libxml2 message may quote the body; the reason stays generic.
        raise XMLError("not well-formed xml") from None
    # Never expected from Weixin and the vehicle of XXE and entity bombs: refuse
    # any DTD even though entities are not resolved.
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise XMLError("doctype not allowed")
    if root.getprevious() is not None or root.getnext() is not None:
        raise XMLError("processing instruction outside the root")
    if root.tag != ROOT_TAG:
        raise XMLError("root element must be xml")
    return _children(root)


def _append(parent: Any, tag: str, value: Any) -> None:
    """Add `value` under `parent` as element(s) named `tag`."""
    if isinstance(value, (list, tuple)):
        for item in value:
            _append(parent, tag, item)
        return
    child = etree.SubElement(parent, tag)
    if value is None:
        return
    if isinstance(value, str):
        # CDATA cannot hold "]]>"; escaped text parses back to the same string.
        child.text = etree.CDATA(value) if "]]>" not in value else value
    elif isinstance(value, bool):
        child.text = "1" if value else "0"  # Weixin's flags are 0/1
    elif isinstance(value, int):
        child.text = str(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _append(child, key, item)
    else:
        raise TypeError(f"cannot put {type(value).__name__} into push xml ({tag})")


def build_xml(fields: Mapping[str, Any]) -> bytes:
    """Build `<xml>` from fields: str as CDATA, int plain, mappings nested, lists repeated."""
    root = etree.Element(ROOT_TAG)
    for key, value in fields.items():
        _append(root, key, value)
    return bytes(etree.tostring(root, encoding="utf-8", xml_declaration=False))
