"""Documents the knowledge tests upload: the labelled set on disk, and .docx/.pdf files built with the same
libraries a user's office suite would produce them with (python-docx; pypdf for a text-layer PDF)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "knowledge"


def labelled_documents() -> list[Path]:
    return sorted(path for path in DATA.iterdir() if path.suffix != ".json")


def labelled_questions() -> list[dict]:
    return json.loads((DATA / "questions.json").read_text())["questions"]


def normalized(text: str) -> str:
    return " ".join(text.split())


def make_docx(title: str, sections: list[tuple[str, list[str]]], table: list[list[str]] | None = None) -> bytes:
    import docx

    document = docx.Document()
    document.core_properties.title = title
    document.add_heading(title, level=0)
    for heading, paragraphs in sections:
        document.add_heading(heading, level=1)
        for paragraph in paragraphs:
            document.add_paragraph(paragraph)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for row, values in zip(grid.rows, table):
            for cell, value in zip(row.cells, values):
                cell.text = value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def make_pdf(pages: list[list[str]]) -> bytes:
    """A PDF with a real text layer (Helvetica, one line per string), the way a word processor exports."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    for lines in pages:
        page = writer.add_blank_page(612, 792)
        font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                                 NameObject("/BaseFont"): NameObject("/Helvetica")})
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        escaped = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in lines]
        text = " Tj T* ".join(f"({line})" for line in escaped)
        stream = DecodedStreamObject()
        stream.set_data(f"BT /F1 11 Tf 14 TL 72 720 Td {text} Tj ET".encode("latin-1"))
        page.replace_contents(stream)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def zip_bomb_docx(inflated_bytes: int) -> bytes:
    """A valid Word document plus one part of zeros that inflates to `inflated_bytes` (deflate: ~1000:1)."""
    base = make_docx("Bomb", [("Section", ["harmless text"])])
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(base)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            target.writestr(item, source.read(item))
        with target.open("word/media/zeros.bin", "w") as part:
            chunk = bytes(1 << 20)
            for _ in range(inflated_bytes >> 20):
                part.write(chunk)
    return out.getvalue()
