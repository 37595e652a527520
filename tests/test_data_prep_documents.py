"""Ingest and cleaning on real files: the 10-K excerpt, hand-built PDFs, Markdown/TXT/HTML, broken inputs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ragtune.data_prep.documents import DocumentError, load_documents


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def write_text_pdf(path: Path, pages: list[list[tuple[int, int, str]]]) -> Path:
    """A minimal valid PDF: each page a list of (x, y, text) lines in Helvetica."""
    objects = {1: "<< /Type /Catalog /Pages 2 0 R >>", 3: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"}
    kids = []
    for i, lines in enumerate(pages):
        page_id, content_id = 4 + 2 * i, 5 + 2 * i
        ops = "".join(f"BT /F1 10 Tf {x} {y} Td ({_escape(t)}) Tj ET\n" for x, y, t in lines)
        objects[content_id] = f"<< /Length {len(ops.encode('latin-1'))} >>\nstream\n{ops}endstream"
        objects[page_id] = ("<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                            f"/Contents {content_id} 0 R /Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{page_id} 0 R")
    objects[2] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>"
    out = b"%PDF-1.4\n"
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += f"{number} 0 obj\n{objects[number]}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offsets[n]:010d} 00000 n \n" for n in sorted(objects)).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


BODY = [
    "The company operates a ride sharing platform in many countries around the world today and",
    "it connects riders with drivers through a mobile application that is available for phones.",
    "Revenue grew in the last year because more people used the delivery and mobility offers.",
    "The headquarters are in San Francisco and the company employs many thousands of people.",
]


def test_excerpt_is_cleaned_with_page_metadata(excerpt_pdf: Path) -> None:
    documents, warnings = load_documents([excerpt_pdf])
    assert warnings == []
    assert [d.metadata["page"] for d in documents] == list(range(1, 9))
    assert all(d.metadata["file"] == "uber_10k_excerpt.pdf" for d in documents)
    text = "\n".join(d.text for d in documents)
    # pypdf's plain extraction of this filing glues line ends to the next line and cuts words
    for glued in ("ourcurrent", "otherfactors", "rapidlychanging", "ope rational", "statemen ts"):
        assert glued not in text
    assert "primarily on our current expectations" in text
    assert "operational excellence and product expertise" in text
    assert "  " not in text  # runs of alignment spaces collapsed
    for document in documents:  # the printed page numbers (3..10) are gone from the page ends
        assert not re.search(r"\n\s*\d{1,3}\s*$", document.text)
    # a bullet item is one paragraph, not one paragraph per visual line
    assert ("We believe all work should be treated equally. We also believe that legislative reform"
            in documents[7].text)


def test_running_header_and_page_numbers_are_removed(tmp_path: Path) -> None:
    pages = []
    for n in range(1, 5):
        lines = [(72, 760, "ACME Corp Annual Report 2021"), (300, 40, f"Page {n} of 4")]
        lines += [(72, 700 - 14 * j, text) for j, text in enumerate(BODY[n - 1:] + BODY[: n - 1])]
        pages.append(lines)
    pdf = write_text_pdf(tmp_path / "acme.pdf", pages)
    documents, _ = load_documents([pdf])
    assert len(documents) == 4
    for document in documents:
        assert "ACME Corp Annual Report" not in document.text
        assert "of 4" not in document.text
        assert "San Francisco" in document.text
        assert document.text.count("\n\n") == 0  # four full-width lines: one paragraph


def test_corrupt_pdf_is_skipped_with_a_warning_naming_it(tmp_path: Path, excerpt_pdf: Path) -> None:
    corrupt = tmp_path / "broken.pdf"
    corrupt.write_bytes(b"%PDF-1.4\n this is not really a pdf \x00\x01\x02")
    documents, warnings = load_documents([corrupt, excerpt_pdf])
    assert len(documents) == 8 and {d.metadata["file"] for d in documents} == {"uber_10k_excerpt.pdf"}
    assert len(warnings) == 1 and str(corrupt) in warnings[0] and "cannot read this PDF" in warnings[0]
    with pytest.raises(DocumentError, match="broken.pdf: cannot read this PDF"):
        load_documents([corrupt])


def test_empty_files_and_image_only_pdf(tmp_path: Path) -> None:
    from pypdf import PdfWriter

    empty_pdf = tmp_path / "empty.pdf"
    empty_pdf.write_bytes(b"")
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("  \n", encoding="utf-8")
    scanned = tmp_path / "scanned.pdf"
    writer = PdfWriter()
    writer.add_blank_page(612, 792)
    writer.add_blank_page(612, 792)
    writer.write(scanned)
    good = tmp_path / "notes.txt"
    good.write_text("Uber operates in about 72 countries.\n\nIts segments are Mobility, Delivery and Freight.\n", encoding="utf-8")

    documents, warnings = load_documents([empty_pdf, empty_txt, scanned, good])
    assert [d.metadata["file"] for d in documents] == ["notes.txt"]
    assert len(warnings) == 3
    assert "empty.pdf: empty file" in warnings[0]
    assert "empty.txt: empty file" in warnings[1]
    assert "scanned.pdf: no extractable text" in warnings[2] and "OCR" in warnings[2]
    with pytest.raises(DocumentError, match="no text could be read") as err:
        load_documents([empty_pdf, scanned])
    assert "empty.pdf" in str(err.value) and "scanned.pdf" in str(err.value)


def test_unsupported_extension_is_an_error_naming_the_file(tmp_path: Path, excerpt_pdf: Path) -> None:
    docx = tmp_path / "report.docx"
    docx.write_bytes(b"PK\x03\x04")
    with pytest.raises(DocumentError, match=r"report\.docx: unsupported file type"):
        load_documents([excerpt_pdf, docx])


def test_markdown_text_and_html(tmp_path: Path) -> None:
    md = tmp_path / "guide.md"
    md.write_text("# Pricing\nRides are priced [upfront](https://x.y/pricing).\n![logo](logo.png)\n\n"
                  + "\n\n".join(f"Paragraph {i} " + "word " * 100 for i in range(8)), encoding="utf-8")
    html = tmp_path / "page.html"
    html.write_text("<html><head><style>p {color: red}</style><script>var secret = 1;</script></head>"
                    "<body><h1>Freight</h1><p>Freight connects   shippers with carriers.</p>"
                    "<ul><li>Upfront pricing</li><li>Instant booking</li></ul></body></html>", encoding="utf-8")
    documents, warnings = load_documents([md, html])
    assert warnings == []
    md_pages = [d for d in documents if d.metadata["file"] == "guide.md"]
    assert len(md_pages) > 1 and [d.metadata["page"] for d in md_pages] == list(range(1, len(md_pages) + 1))
    assert md_pages[0].text.startswith("Pricing\n\nRides are priced upfront.")
    assert "https://" not in md_pages[0].text and "logo" not in md_pages[0].text
    (html_page,) = [d for d in documents if d.metadata["file"] == "page.html"]
    assert html_page.text == "Freight\n\nFreight connects shippers with carriers.\n\nUpfront pricing\n\nInstant booking"


def test_document_names_do_not_depend_on_where_the_folder_lives(tmp_path: Path) -> None:
    """`document` is the path below the documents' common folder: chunk ids and the split use it, so a
    moved checkout gives the same ids; equal file names in two subfolders stay apart."""
    from ragtune.data_prep.prep import _chunk_id

    ids = []
    for place in ("checkout_a", "elsewhere/checkout_b"):
        for sub in ("x", "y"):
            (tmp_path / place / sub).mkdir(parents=True)
            (tmp_path / place / sub / "notes.txt").write_text(f"Notes from {sub}: Uber Freight.", encoding="utf-8")
        documents, _ = load_documents([tmp_path / place / "x" / "notes.txt", tmp_path / place / "y" / "notes.txt"])
        assert [d.metadata["document"] for d in documents] == ["x/notes.txt", "y/notes.txt"]
        ids.append([_chunk_id(d.metadata, 0) for d in documents])
    assert ids[0] == ids[1] and ids[0][0] != ids[0][1]
