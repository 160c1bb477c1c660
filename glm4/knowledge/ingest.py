"""Documents in, passages out: parse .txt/.md/.pdf/.docx/.html into headed sections, then split them into passages.

Parsing refuses what it cannot read with a `DocumentError` whose `code` is OpenAI's vector-store file error code
(`unsupported_file`, `invalid_file`), so the API can answer 400 at upload and `last_error` at indexing alike.
Untrusted bytes never decide a path or an allocation: the .docx zip is measured before it is opened, PDFs go
through pypdf's own output limits, HTML through an HTML parser that does not fetch or execute anything.
"""

from __future__ import annotations

import io
import logging
import re
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable

log = logging.getLogger(__name__)


class DocumentError(ValueError):
    """A file that cannot become passages; `code` is the OpenAI `last_error.code` for it."""

    code = "invalid_file"


class UnsupportedFile(DocumentError):
    code = "unsupported_file"


class InvalidFile(DocumentError):
    code = "invalid_file"


@dataclass(frozen=True)
class Section:
    headings: tuple[str, ...]  # from the document's title down to this section's own heading
    paragraphs: tuple[str, ...]


@dataclass(frozen=True)
class Document:
    title: str
    sections: tuple[Section, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(p for section in self.sections for p in section.paragraphs)


@dataclass(frozen=True)
class Passage:
    text: str
    headings: tuple[str, ...]

    @property
    def heading(self) -> str:
        """'Guide > Wi-Fi bands': where in the document the passage is, shown beside quotes and indexed too."""
        return " > ".join(self.headings)


# ---------- parsing ----------

MAX_ZIP_ENTRIES = 10_000  # a Word document has a few dozen parts; thousands is a zip made to hurt
TERMINAL_PUNCTUATION = tuple("。．.!！?？:：;；,，、…")
CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
CJK_CHAR = re.compile(f"[{CJK}]")


def extension_of(filename: str) -> str:
    """'.md' for 'notes.MD'; the name is only looked at, never used as a path."""
    return PurePosixPath(filename.replace("\\", "/")).suffix.lower()


def check_supported(filename: str) -> str:
    extension = extension_of(filename)
    if extension not in PARSERS:
        shown = extension or "no extension"
        raise UnsupportedFile(f"files of type {shown!r} are not supported; upload one of "
                              f"{', '.join(sorted(set(PARSERS)))}")
    return extension


def parse(filename: str, data: bytes, *, max_unpacked_size: int = 64 * 2**20) -> Document:
    """The document's title and sections, or DocumentError saying why not."""
    extension = check_supported(filename)
    if not data:
        raise InvalidFile("the file is empty")
    title = PurePosixPath(filename.replace("\\", "/")).stem
    if extension == ".docx":
        document = parse_docx(data, title, max_unpacked_size)
    else:
        document = PARSERS[extension](data, title)
    if not any(section.paragraphs for section in document.sections):
        raise InvalidFile("no text could be extracted from the file"
                          + (" (a scanned PDF has only images: run OCR on it first)" if extension == ".pdf" else ""))
    return document


def decode_text(data: bytes) -> str:
    """UTF-8 (with or without BOM), UTF-16 with BOM, else GB18030 (Chinese Windows files); binary is refused."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = try_decode(data, "utf-16")
    else:
        text = try_decode(data, "utf-8-sig") or try_decode(data, "gb18030")
    if text is None or looks_binary(text):
        raise InvalidFile("the file is not text (binary content, or an encoding other than UTF-8, UTF-16 or GB18030)")
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def try_decode(data: bytes, encoding: str) -> str | None:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        return None


def looks_binary(text: str) -> bool:
    """NUL, or more than 1 in 200 characters being control codes: no text file looks like that."""
    if "\x00" in text:
        return True
    controls = sum(1 for ch in text if unicodedata.category(ch) == "Cc" and ch not in "\t\n\f\v")
    return controls * 200 > len(text)


def join_lines(lines: list[str]) -> str:
    """Soft-wrapped lines back into one paragraph: a space between words, nothing between two CJK characters;
    list items and table rows keep their line breaks."""
    out = ""
    for line in (line.strip() for line in lines):
        if not line:
            continue
        if not out:
            out = line
        elif re.match(r"([-*+•]|\d+[.)、]|\|)\s*", line):
            out += "\n" + line
        elif CJK_CHAR.match(line[0]) and CJK_CHAR.match(out[-1]):
            out += line
        else:
            out += " " + line
    return out


class SectionBuilder:
    """Collects headings and paragraphs in reading order into Sections (a heading closes the section before)."""

    def __init__(self, title: str):
        self.title = title
        self.path: list[tuple[int, str]] = []  # (level, heading) from the outermost in
        self.paragraphs: list[str] = []
        self.sections: list[Section] = []

    def heading(self, level: int, text: str) -> None:
        text = " ".join(text.split())
        if not text:
            return
        self.flush()
        while self.path and self.path[-1][0] >= level:
            self.path.pop()
        self.path.append((level, text))

    def paragraph(self, text: str) -> None:
        text = text.strip()
        if text:
            self.paragraphs.append(text)

    def flush(self) -> None:
        if self.paragraphs:
            self.sections.append(Section(self.headings(), tuple(self.paragraphs)))
            self.paragraphs = []

    def headings(self) -> tuple[str, ...]:
        names = [name for _, name in self.path]
        if not names or names[0] != self.title:
            names.insert(0, self.title)  # every passage says which document it is from
        return tuple(names)

    def document(self) -> Document:
        self.flush()
        return Document(self.title, tuple(self.sections))


def blocks(text: str) -> list[list[str]]:
    """Lines grouped by blank lines."""
    groups: list[list[str]] = [[]]
    for line in text.split("\n"):
        if line.strip():
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    return [group for group in groups if group]


def parse_txt(data: bytes, title: str) -> Document:
    """Paragraphs are separated by blank lines. A one-line paragraph that is short and does not end in punctuation
    is taken as a heading ('第一章 总则', 'Chapter 2'); the first such line, when it opens the file, is the title."""
    groups = blocks(decode_text(data))
    if groups and len(groups[0]) == 1 and is_heading_line(groups[0][0]) and len(groups) > 1:
        title = groups.pop(0)[0].strip()
    builder = SectionBuilder(title)
    for index, group in enumerate(groups):
        if len(group) == 1 and is_heading_line(group[0]) and index + 1 < len(groups):
            builder.heading(2, group[0])
        else:
            builder.paragraph(join_lines(group))
    return builder.document()


def is_heading_line(line: str) -> bool:
    line = line.strip()
    return 0 < len(line) <= 40 and not line.endswith(TERMINAL_PUNCTUATION) and not line.startswith(("-", "*", "•"))


MD_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
MD_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def parse_md(data: bytes, title: str) -> Document:
    """ATX (#) and setext (=== / ---) headings; a level-1 heading at the top is the title; code fences stay whole."""
    lines = decode_text(data).split("\n")
    builder = SectionBuilder(title)
    pending: list[str] = []
    in_fence = False
    seen_text = False

    def flush_pending():
        if pending:
            builder.paragraph("\n".join(pending) if in_fence else join_lines(pending))
            pending.clear()

    for line in lines:
        if MD_FENCE.match(line):
            if in_fence:
                pending.append(line)
                builder.paragraph("\n".join(pending))
                pending.clear()
                in_fence = False
            else:
                flush_pending()
                pending.append(line)
                in_fence = True
            continue
        if in_fence:
            pending.append(line)
            continue
        heading = MD_HEADING.match(line)
        if heading:
            flush_pending()
            level, text = len(heading.group(1)), heading.group(2)
            if level == 1 and not seen_text and builder.title != text and not builder.sections:
                builder.title = " ".join(text.split())  # "# Title" on top names the document
            builder.heading(level, text)
            seen_text = True
            continue
        if pending and re.match(r"^ {0,3}(=+|-+)\s*$", line) and len(pending) == 1:  # setext underline
            text = pending.pop()
            builder.heading(1 if line.strip().startswith("=") else 2, text)
            seen_text = True
            continue
        if line.strip():
            pending.append(line)
            seen_text = True
        else:
            flush_pending()
    flush_pending()
    return builder.document()


HTML_SKIPPED = {"script", "style", "noscript", "template", "nav", "footer", "svg", "iframe", "object", "head"}
HTML_BLOCKS = {"p", "div", "li", "pre", "blockquote", "td", "th", "dt", "dd", "figcaption", "caption", "section",
               "article", "main", "aside", "header", "tr", "table", "ul", "ol", "dl", "form", "address", "hr"}


def parse_html(data: bytes, title: str) -> Document:
    """Visible text by block element; h1-h6 are headings; scripts, styles, navigation and footers are dropped."""
    from bs4 import BeautifulSoup, NavigableString, Tag
    from bs4.element import Comment, Declaration, Doctype, ProcessingInstruction

    text = decode_text(data)
    soup = BeautifulSoup(text, "html.parser")  # the stdlib parser: no network, no entity expansion beyond HTML's
    title_tag = soup.find("title")
    if title_tag and title_tag.get_text(strip=True):
        title = " ".join(title_tag.get_text().split())
    builder = SectionBuilder(title)
    buffer: list[str] = []

    def flush():
        joined = "".join(buffer)
        buffer.clear()
        builder.paragraph(join_lines(joined.split("\n")))

    def walk(node) -> None:
        for child in node.children:
            if isinstance(child, (Comment, Declaration, Doctype, ProcessingInstruction)):
                continue
            if isinstance(child, NavigableString):
                buffer.append(str(child))
            elif isinstance(child, Tag):
                name = child.name.lower()
                if name in HTML_SKIPPED:
                    continue
                if re.fullmatch(r"h[1-6]", name):
                    flush()
                    builder.heading(int(name[1]), child.get_text(" "))
                elif name == "br":
                    buffer.append("\n")
                elif name in HTML_BLOCKS:
                    flush()
                    walk(child)
                    flush()
                else:
                    walk(child)

    walk(soup.body or soup)
    flush()
    return builder.document()


def parse_docx(data: bytes, title: str, max_unpacked_size: int = 64 * 2**20) -> Document:
    """Paragraphs and tables in body order; 'Heading N' / 'Title' styles are headings. The zip's declared sizes
    are summed before anything is inflated (zipfile never inflates past a member's declared size)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
        raise InvalidFile("the .docx file is not a valid Word document (not a zip archive)") from None
    unpacked = sum(member.file_size for member in members)
    if len(members) > MAX_ZIP_ENTRIES or unpacked > max_unpacked_size:
        raise InvalidFile(f"the .docx file unpacks to {unpacked} bytes in {len(members)} parts, over the limit of "
                          f"{max_unpacked_size} bytes (--max-unpacked-size)")
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        word = docx.Document(io.BytesIO(data))
        core_title = (word.core_properties.title or "").strip()
        builder = SectionBuilder(core_title or title)
        for item in word.iter_inner_content():
            if isinstance(item, Paragraph):
                style = (item.style.name if item.style is not None else "") or ""
                level = heading_level(style)
                if level is not None:
                    builder.heading(level, item.text)
                else:
                    builder.paragraph(item.text)
            elif isinstance(item, Table):
                for row in item.rows:
                    cells = dict.fromkeys(cell.text.strip() for cell in row.cells)  # merged cells repeat
                    builder.paragraph(" | ".join(cell for cell in cells if cell))
        return builder.document()
    except Exception as error:  # noqa: BLE001 - untrusted bytes inside a real zip: python-docx and lxml raise
        # KeyError, ValueError, XMLSyntaxError, PackageNotFoundError, ... for parts that are missing or broken
        log.info("unreadable .docx: %r", error)
        raise InvalidFile("the .docx file is not a valid Word document (its document part is missing or "
                          "broken)") from None


def heading_level(style: str) -> int | None:
    name = style.strip().lower()
    if name == "title":
        return 1
    match = re.fullmatch(r"(heading|标题)\s*(\d)", name)
    return int(match.group(2)) if match else None


def parse_pdf(data: bytes, title: str) -> Document:
    """The text layer page by page; each page is a section ('report > page 3') so citations can name the page."""
    import pypdf
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # malformed files make it warn for every broken object
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise InvalidFile("the PDF is encrypted with a password")
        meta_title = ""
        try:
            meta_title = ((reader.metadata or {}).get("/Title") or "").strip()
        except (PyPdfError, ValueError, TypeError, KeyError):
            pass  # a broken info dictionary is no reason to refuse the text
        builder = SectionBuilder(str(meta_title) or title)
        for number, page in enumerate(reader.pages, start=1):
            text = page.extract_text() or ""
            groups = blocks(unicodedata.normalize("NFC", text))
            if groups:
                builder.heading(2, f"page {number}")
                for group in groups:
                    builder.paragraph(join_lines(group))
        return builder.document()
    except InvalidFile:
        raise
    except Exception as error:  # noqa: BLE001 - pypdf on hostile input raises many kinds (PdfReadError, KeyError,
        # ValueError, TypeError, RecursionError, zlib.error, ...); each one means "this PDF cannot be read"
        log.info("unreadable PDF: %r", error)
        raise InvalidFile("the PDF file is damaged or not a PDF") from None


PARSERS: dict[str, Callable[[bytes, str], Document]] = {
    ".txt": parse_txt, ".text": parse_txt, ".md": parse_md, ".markdown": parse_md, ".html": parse_html,
    ".htm": parse_html, ".pdf": parse_pdf, ".docx": parse_docx,  # parse() hands .docx its unpacked-size limit
}


# ---------- splitting ----------

WORD_OR_MARK = re.compile(rf"[{CJK}]|[^\s{CJK}]+")


def estimate_tokens(text: str) -> int:
    """A model-free token count that errs high: one per CJK character (GLM-4 averages below one), 4/3 per word
    or mark otherwise. Passages are cut by it, so the index does not change when the model does."""
    cjk = len(CJK_CHAR.findall(text))
    others = len(WORD_OR_MARK.findall(text)) - cjk
    return cjk + (others * 4 + 2) // 3


SENTENCE_END = re.compile(r"(?<=[。！？!?；;])|(?<=[.!?])\s+|\n")


def split(document: Document, max_tokens: int = 400, overlap_tokens: int = 100,
          count_tokens: Callable[[str], int] = estimate_tokens) -> list[Passage]:
    """Passages of at most `max_tokens` (the heading line included), packed from whole paragraphs, then whole
    sentences, then hard cuts for a sentence longer than a passage; consecutive passages of one section share
    up to `overlap_tokens` of trailing sentences. A passage never spans two sections."""
    if max_tokens < 16 or not 0 <= overlap_tokens <= max_tokens // 2:
        raise ValueError("need max_tokens >= 16 and 0 <= overlap_tokens <= max_tokens / 2")
    passages: list[Passage] = []
    for section in document.sections:
        heading_cost = count_tokens(" > ".join(section.headings)) + 1
        budget = max(8, max_tokens - heading_cost)
        units = section_units(section, budget, count_tokens)
        passages.extend(Passage(text, section.headings) for text in pack(units, budget, overlap_tokens))
    return passages


@dataclass(frozen=True)
class Unit:
    text: str
    tokens: int
    paragraph: int  # units of one paragraph join without a blank line


def section_units(section: Section, budget: int, count_tokens: Callable[[str], int]) -> list[Unit]:
    units: list[Unit] = []
    for index, paragraph in enumerate(section.paragraphs):
        tokens = count_tokens(paragraph)
        if tokens <= budget:
            units.append(Unit(paragraph, tokens, index))
            continue
        for sentence in (part.strip() for part in SENTENCE_END.split(paragraph)):
            if not sentence:
                continue
            tokens = count_tokens(sentence)
            if tokens <= budget:
                units.append(Unit(sentence, tokens, index))
            else:
                units.extend(Unit(piece, count_tokens(piece), index) for piece in hard_cut(sentence, budget,
                                                                                          count_tokens))
    return units


def hard_cut(text: str, budget: int, count_tokens: Callable[[str], int]) -> list[str]:
    """A sentence longer than a passage, cut at word (or CJK character) boundaries."""
    pieces, current = [], ""
    for match in re.finditer(rf"[{CJK}]|\S+\s*|\s+", text):
        candidate = current + match.group(0)
        if current and count_tokens(candidate) > budget:
            pieces.append(current.strip())
            current = match.group(0)
        else:
            current = candidate
    if current.strip():
        pieces.append(current.strip())
    return pieces


def pack(units: list[Unit], budget: int, overlap_tokens: int) -> list[str]:
    passages: list[str] = []
    current: list[Unit] = []
    used = 0
    for unit in units:
        if current and used + unit.tokens > budget:
            passages.append(render_units(current))
            carried: list[Unit] = []
            carried_tokens = 0
            for previous in reversed(current):
                if (carried_tokens + previous.tokens > overlap_tokens
                        or carried_tokens + previous.tokens + unit.tokens > budget):
                    break
                carried.insert(0, previous)
                carried_tokens += previous.tokens
            current, used = carried, carried_tokens
        current.append(unit)
        used += unit.tokens
    if current:
        passages.append(render_units(current))
    return passages


def render_units(units: list[Unit]) -> str:
    text = units[0].text
    for previous, unit in zip(units, units[1:]):
        if unit.paragraph != previous.paragraph:
            text += "\n\n" + unit.text
        elif CJK_CHAR.match(unit.text[0]) or CJK_CHAR.match(previous.text[-1]):
            text += unit.text
        else:
            text += " " + unit.text
    return text
