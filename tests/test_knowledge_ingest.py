"""Parsing each supported format into headed sections, refusing what cannot be read, and splitting into passages
within a token budget with overlap (glm4/knowledge/ingest.py)."""

from __future__ import annotations

import pytest

from glm4.knowledge.ingest import (InvalidFile, UnsupportedFile, estimate_tokens, parse, split)
from tests.knowledge_docs import DATA, make_docx, make_pdf, normalized, zip_bomb_docx


def sections_of(document) -> dict[str, str]:
    return {" > ".join(s.headings): "\n\n".join(s.paragraphs) for s in document.sections}


def test_markdown_headings_become_the_path_of_each_section():
    document = parse("manual.md", (DATA / "coffee-machine-manual.md").read_bytes())
    assert document.title == "晨光 CM-300 全自动咖啡机使用手册"
    sections = sections_of(document)
    assert "水箱容量为 1.8 升" in sections["晨光 CM-300 全自动咖啡机使用手册 > 首次使用"]
    assert "屏幕显示 E3" in sections["晨光 CM-300 全自动咖啡机使用手册 > 故障排除"]


def test_markdown_soft_wrapped_lines_join_and_code_fences_stay_whole():
    text = "# T\n\nThe first line\nwraps here.\n\n中文第一行\n接着第二行。\n\n```\nline 1\nline 2\n```\n\n- item a\n- item b\n"
    paragraphs = parse("a.md", text.encode()).sections[0].paragraphs
    assert paragraphs == ("The first line wraps here.", "中文第一行接着第二行。", "```\nline 1\nline 2\n```",
                          "- item a\n- item b")


def test_plain_text_short_lines_are_headings_and_the_first_is_the_title():
    document = parse("policy.txt", (DATA / "travel-policy.txt").read_bytes())
    assert document.title == "星河科技有限公司差旅费用报销制度"
    sections = sections_of(document)
    assert "每人每晚不超过 600 元" in sections["星河科技有限公司差旅费用报销制度 > 第三章 住宿标准"]


def test_plain_text_in_gb18030_and_utf16_is_read():
    text = "标题\n\n这是用国标编码保存的中文文件。"
    for encoding in ("gb18030", "utf-16"):
        assert "国标编码" in parse("old.txt", text.encode(encoding)).text


def test_html_keeps_headings_and_visible_text_only():
    document = parse("router.html", (DATA / "router-guide.html").read_bytes())
    assert document.title == "Nimbus AX1800 Wi-Fi Router: User Guide"
    sections = sections_of(document)
    reset = sections["Nimbus AX1800 Wi-Fi Router: User Guide > Resetting to factory settings"]
    assert "for 10 seconds" in normalized(reset)
    assert "Solid red: no internet connection" in sections["Nimbus AX1800 Wi-Fi Router: User Guide > "
                                                          "What the status light means"]
    everything = document.text
    assert "window.analytics" not in everything and "font-family" not in everything  # script and style
    assert "All rights reserved" not in everything and "Support" not in everything  # footer and nav


def test_docx_headings_paragraphs_and_tables():
    data = make_docx("Staff handbook", [("Annual leave", ["Employees get 25 days of paid leave.",
                                                          "员工每年享有 25 天带薪年假。"]),
                                        ("Sick leave", ["Tell your manager before 10 a.m."])],
                     table=[["Grade", "Days"], ["A", "25"]])
    sections = sections_of(parse("handbook.docx", data))
    assert sections["Staff handbook > Annual leave"].startswith("Employees get 25 days")
    assert "员工每年享有" in sections["Staff handbook > Annual leave"]
    assert "Grade | Days" in sections["Staff handbook > Sick leave"]


def test_pdf_text_layer_page_by_page():
    data = make_pdf([["Revenue grew by 12 percent."], ["Costs fell by 3 percent."]])
    sections = sections_of(parse("report.pdf", data))
    assert sections == {"report > page 1": "Revenue grew by 12 percent.", "report > page 2": "Costs fell by 3 percent."}


@pytest.mark.parametrize("name", ["image.png", "archive.zip", "no-extension", "sheet.xlsx", "script.py"])
def test_unsupported_types_are_refused_by_name(name):
    with pytest.raises(UnsupportedFile, match="not supported"):
        parse(name, b"anything")


@pytest.mark.parametrize("name, data, message", [
    ("empty.txt", b"", "empty"),
    ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, "not text"),
    ("random.md", bytes((i * 73 + 41) % 256 for i in range(4096)), "not text"),
    ("whitespace.md", b"  \n\n \t \n", "no text"),
    ("garbage.pdf", b"%PDF-1.7\nthis is not a PDF body at all", "damaged"),
    ("random.pdf", bytes((i * 31 + 7) % 256 for i in range(2048)), "damaged"),
    ("text.docx", b"plain text, not a zip", "not a valid Word document"),
    ("parts.docx", None, "not a valid Word document"),
])
def test_unreadable_documents_are_refused_with_the_reason(name, data, message):
    if data is None:  # a zip without Word's parts
        import io
        import zipfile

        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            archive.writestr("hello.txt", "hi")
        data = out.getvalue()
    with pytest.raises(InvalidFile, match=message):
        parse(name, data)


def test_docx_zip_bomb_is_refused_before_inflating():
    bomb = zip_bomb_docx(64 * 2**20)
    assert len(bomb) < 2**20  # a small upload ...
    with pytest.raises(InvalidFile, match="unpacks to .* over the limit"):
        parse("bomb.docx", bomb, max_unpacked_size=8 * 2**20)  # ... that would inflate to 64 MiB


def test_split_respects_the_budget_keeps_headings_and_overlaps():
    sentences = [f"Sentence number {i} talks about topic {i % 7}." for i in range(120)]
    document = parse("long.md", ("# Long\n\n## Part\n\n" + " ".join(sentences)).encode())
    passages = split(document, max_tokens=100, overlap_tokens=30)
    assert len(passages) > 5
    for passage in passages:
        assert passage.heading == "Long > Part"
        assert estimate_tokens(passage.heading) + 1 + estimate_tokens(passage.text) <= 100
    for first, second in zip(passages, passages[1:]):
        assert first.text.split(". ")[-1] in second.text  # the last sentence of one opens the next
    joined = " ".join(p.text for p in passages)
    assert all(sentence in joined for sentence in sentences)  # nothing lost


def test_split_never_crosses_sections_and_cuts_an_endless_chinese_sentence():
    document = parse("zh.md", ("# 文档\n\n## 甲\n\n" + "很长的句子" * 200 + "\n\n## 乙\n\n短段落。").encode())
    passages = split(document, max_tokens=64, overlap_tokens=0)
    assert {p.heading for p in passages} == {"文档 > 甲", "文档 > 乙"}
    assert all(estimate_tokens(p.text) <= 64 for p in passages)
    assert "".join(p.text for p in passages if p.heading == "文档 > 甲") == "很长的句子" * 200


def test_split_rejects_an_overlap_larger_than_half_the_passage():
    document = parse("a.md", b"# A\n\ntext")
    with pytest.raises(ValueError):
        split(document, max_tokens=100, overlap_tokens=60)
