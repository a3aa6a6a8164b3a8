"""Safe, bounded XML parsing for the Philips and HL7 aECG readers, whatever encoding the bytes use.

Vendor XML states its encoding in a declaration that is often wrong: Philips carts write UTF-16
files that declare ``utf-8`` and UTF-8 files that declare ``utf-16``. The bytes decide here: a byte
order mark first, then the position of NUL bytes around the first ``<`` (UTF-16 LE or BE), then
strict UTF-8, then the declared single-byte encoding, then Latin-1. The text is re-encoded as UTF-8 without its
declaration and handed to ``defusedxml`` with DTDs forbidden, so no DTD, entity or external
reference gets through in any encoding. A tree builder caps nesting depth and element count: a
10 MB file of empty elements would otherwise build a tree of hundreds of megabytes.
"""

from __future__ import annotations

import codecs
import re
from xml.etree import ElementTree

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from cds_service.ecg.record import EcgRejected

MAX_DEPTH: int = 64
"""Deepest element nesting accepted (HL7 aECG nests about 15 levels, Philips about 8)."""

MAX_ELEMENTS: int = 50_000
"""Most elements accepted in one document (the sample files hold a few thousand)."""

SNIFF_BYTES: int = 8192
"""How much of a file :func:`head_text` decodes for format detection."""

_DECLARATION = re.compile(r"\A\s*<\?xml[^>]*\?>")
_DECLARED = re.compile(rb"""\A\s*<\?xml[^>]*encoding\s*=\s*["']([A-Za-z0-9._-]{1,40})["']""")


def _encoding(data: bytes) -> str | None:
    """The encoding the bytes show (BOM or NUL pattern), or ``None`` when they look 8-bit."""
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if len(data) >= 2 and data[0] != 0 and data[1] == 0:
        return "utf-16-le"
    if len(data) >= 2 and data[0] == 0 and data[1] != 0:
        return "utf-16-be"
    return None


def _declared_8bit(data: bytes) -> str | None:
    """The declared encoding when it is an ASCII-compatible one Python knows, else ``None``."""
    match = _DECLARED.match(data[:256])
    if not match:
        return None
    try:
        name = codecs.lookup(match.group(1).decode("ascii")).name
    except LookupError:
        return None
    return None if name.startswith(("utf-16", "utf-32", "utf_16", "utf_32")) else name


def xml_text(data: bytes, what: str) -> str:
    """Decode XML bytes by what the bytes are, not by what the declaration says.

    Raises:
        EcgRejected: ``unreadable`` when the bytes are not text in the detected encoding.
    """
    encoding = _encoding(data)
    try:
        if encoding is not None:
            return data.decode(encoding)
        for candidate in ("utf-8", _declared_8bit(data)):
            if candidate is not None:
                try:
                    return data.decode(candidate)
                except UnicodeDecodeError:
                    continue
        return data.decode("latin-1")
    except UnicodeDecodeError as exc:
        raise EcgRejected("unreadable", f"{what}: not text in {exc.encoding}") from exc


def head_text(data: bytes) -> str:
    """The first :data:`SNIFF_BYTES` of a file as text, for format detection (never raises)."""
    head = data[:SNIFF_BYTES]
    encoding = _encoding(head) or "utf-8"
    if encoding.startswith("utf-16") and len(head) % 2:
        head = head[:-1]
    return head.decode(encoding, errors="replace")


class _BoundedBuilder(ElementTree.TreeBuilder):
    """A tree builder that refuses documents nested too deep or holding too many elements."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self._what = what
        self._depth = 0
        self._count = 0

    def start(self, tag: str, attrs: dict[str, str]) -> ElementTree.Element:
        self._depth += 1
        self._count += 1
        if self._depth > MAX_DEPTH:
            raise EcgRejected("unreadable", f"{self._what}: XML nested deeper than {MAX_DEPTH} levels")
        if self._count > MAX_ELEMENTS:
            raise EcgRejected("unreadable", f"{self._what}: XML holds more than {MAX_ELEMENTS} elements")
        return super().start(tag, attrs)

    def end(self, tag: str) -> ElementTree.Element:
        self._depth -= 1
        return super().end(tag)


def parse_xml(data: bytes, what: str) -> ElementTree.Element:
    """Parse vendor XML safely and return its root element.

    Raises:
        EcgRejected: ``unsafe_xml`` for a DTD, entity or external reference; ``unreadable`` for
            text that is not well-formed XML or exceeds the depth and element caps.
    """
    text = _DECLARATION.sub("", xml_text(data, what).lstrip("\ufeff"), count=1)
    parser = DefusedXMLParser(target=_BoundedBuilder(what), forbid_dtd=True)
    try:
        parser.feed(text.encode("utf-8"))
        root: ElementTree.Element = parser.close()
    except DefusedXmlException as exc:
        raise EcgRejected("unsafe_xml", f"{what}: the XML declares a DTD or entities") from exc
    except ElementTree.ParseError as exc:
        raise EcgRejected("unreadable", f"{what}: not well-formed XML ({exc})") from exc
    return root


def local(tag: object) -> str:
    """An element's tag without its ``{namespace}``."""
    return str(tag).rsplit("}", 1)[-1]


def text_of(element: ElementTree.Element | None) -> str | None:
    """The stripped text of ``element``, or ``None`` when it is absent or empty."""
    if element is None or element.text is None:
        return None
    return element.text.strip() or None
