"""Read a domain's documents into clean LlamaIndex `Document`s, one per page, with file/page metadata.

PDFs are read page by page with pypdf's *layout* extraction: its default extraction of filings like
the sample 10-K glues the last word of a line to the first of the next ("ourcurrent") and cuts words
at line ends ("ope\\nrational"); layout mode keeps the visual lines intact, so cleaning only has to
drop running headers/footers and page numbers, rejoin lines into paragraphs and collapse the
column-alignment spaces. Markdown, text and HTML have no pages: their text is cut at paragraph
boundaries into page-sized regions (`page` is then the region number), so the held-out split by
page works for every format.

A file that yields no text (corrupt, empty, scanned/image-only) is reported by name and skipped so
the other files still go through; `load_documents` raises only when nothing usable is left.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path

from llama_index.core import Document

from ragtune.core.artifacts import NotUtf8Error, decode_utf8
from ragtune.core.errors import UserFacingError
from ragtune.core.precision import busy
from ragtune.data_prep.config import DOCUMENT_SUFFIXES

log = logging.getLogger(__name__)

REGION_CHARS = 3000  # a "page" of a format without pages: about one PDF page of text
EDGE_LINES = 2  # running headers/footers are looked for in this many lines at each end of a page
CLEANING_VERSION = 2  # bump when cleaning changes, so cached chunks are rebuilt

_PAGE_NUMBER = re.compile(r"^(page\s*)?[-–—]?\s*\d{1,4}\s*[-–—]?(\s*(of|/)\s*\d{1,4})?$", re.IGNORECASE)
_BULLET = re.compile(r"^[•◦▪●■\-*–]\s|^\(?\d{1,2}[.)]\s|^\(?[a-z][.)]\s")


class DocumentError(UserFacingError, ValueError):
    """A document problem, phrased for the user: which file, what is wrong, what to do."""


def load_documents(paths: list[Path]) -> tuple[list[Document], list[str]]:
    """Read every file into page Documents; return them with one warning per file that was skipped.

    Raises DocumentError for an unsupported extension (a config mistake: fix `documents:`), or when
    no file produced any text.
    """
    unsupported = [p for p in paths if Path(p).suffix.lower() not in DOCUMENT_SUFFIXES]
    if unsupported:
        names = ", ".join(str(p) for p in unsupported)
        raise DocumentError(
            f"{names}: unsupported file type. ragtune reads {', '.join(DOCUMENT_SUFFIXES)}; "
            "convert the file or remove it from `documents:` in the config."
        )
    documents: list[Document] = []
    warnings: list[str] = []
    # `document`: the path below the documents' common folder, so ids and the split do not depend on
    # where the checkout lives (the same config gives the same chunks, questions and rows anywhere)
    root = Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths])) if paths else Path()
    for path in paths:
        path = Path(path)
        try:
            pages = _read_pdf(path) if path.suffix.lower() == ".pdf" else _read_text_file(path)
        except DocumentError as err:
            log.warning("%s", err)
            warnings.append(str(err))
            continue
        for page, text in pages:
            metadata = {"file": path.name, "file_path": str(path),
                        "document": path.resolve().relative_to(root).as_posix(), "page": page}
            documents.append(Document(
                text=text, metadata=metadata, id_=f"{path}#page={page}",
                # chunks are embedded and shown to the LLM as plain text, without the metadata header
                excluded_embed_metadata_keys=list(metadata), excluded_llm_metadata_keys=list(metadata),
            ))
    if not documents:
        raise DocumentError("no text could be read from any document:\n" + "\n".join(warnings))
    return documents, warnings


def check_readable(path: Path) -> str:
    """Open a document as far as `load_documents` needs to know it can read it, without extracting text (a dry
    run must stay quick on a 300-page filing): a PDF's page count, a text file's UTF-8. Returns what was seen
    ("12 pages"); raises DocumentError naming the file (and line) as prep's warning would."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise DocumentError(f"{path}: empty file (0 bytes). Replace it with the real document or remove it.")
    if path.suffix.lower() != ".pdf":
        try:
            text = decode_utf8(path.read_bytes(), path)
        except NotUtf8Error as err:
            raise DocumentError(str(err)) from None
        lines = text.count("\n") + (not text.endswith("\n"))
        return f"{lines} lines"
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        pages = len(PdfReader(path).pages)
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as err:
        raise DocumentError(f"{path}: cannot read this PDF ({type(err).__name__}: {err}). Check that the file "
                            "opens in a PDF viewer, or re-export it.") from None
    if not pages:
        raise DocumentError(f"{path}: the PDF has no pages.")
    return f"{pages} pages"


def _read_pdf(path: Path) -> list[tuple[int, str]]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    if path.stat().st_size == 0:
        raise DocumentError(f"{path}: empty file (0 bytes); skipped. Replace it with the real PDF.")
    try:
        reader = PdfReader(path)
        raw_pages = [_extract_page(page) for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as err:
        raise DocumentError(
            f"{path}: cannot read this PDF ({type(err).__name__}: {err}); skipped. "
            "Check that the file opens in a PDF viewer, or re-export it."
        ) from None
    if not raw_pages:
        raise DocumentError(f"{path}: the PDF has no pages; skipped.")
    pages = [(number, text) for number, text in enumerate(clean_pdf_pages(raw_pages), start=1) if text]
    if not pages:
        raise DocumentError(
            f"{path}: no extractable text in {len(raw_pages)} page(s) — a scanned or image-only PDF; skipped. "
            "Run OCR first (e.g. `ocrmypdf in.pdf out.pdf`) and point `documents:` at the result."
        )
    return pages


def _extract_page(page: object) -> str:
    """One page's text; a precision probe (the teacher's server starting beside the read) waits for it, and it for
    the probe (`precision.busy`)."""
    with busy():
        try:
            return page.extract_text(extraction_mode="layout")  # type: ignore[attr-defined]
        except Exception as err:  # layout mode fails on some odd fonts; plain mode still gives the words
            log.debug("layout extraction failed (%s); using plain extraction", err)
            return page.extract_text()  # type: ignore[attr-defined]


def clean_pdf_pages(pages: list[str]) -> list[str]:
    """Clean layout-extracted page texts: drop running headers/footers and page numbers, rejoin paragraphs."""
    page_lines = [[line for line in _normalize(text).splitlines()] for text in pages]
    repeated = _running_lines(page_lines)
    cleaned = []
    for lines in page_lines:
        lines = _strip_edges(lines, repeated)
        cleaned.append(_join_paragraphs(lines))
    return cleaned


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).replace("\u00ad", "")  # ligatures, soft hyphens
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")


def _edge_key(line: str) -> str:
    return re.sub(r"\d+", "#", " ".join(line.split())).lower()


def _edges(lines: list[str]) -> list[str]:
    content = [line for line in lines if line.strip()]
    return content[:EDGE_LINES] + content[-EDGE_LINES:]


def _running_lines(page_lines: list[list[str]]) -> set[str]:
    """Lines (digits ignored) found at the top or bottom of at least half the pages: headers and footers."""
    if len(page_lines) < 3:
        return set()
    counts = Counter(key for lines in page_lines for key in {_edge_key(line) for line in _edges(lines)})
    return {key for key, count in counts.items() if count >= max(3, len(page_lines) / 2)}


def _strip_edges(lines: list[str], repeated: set[str]) -> list[str]:
    """Remove running headers/footers and page-number lines from the start and end of one page."""
    content = [i for i, line in enumerate(lines) if line.strip()]
    edge = set(content[:EDGE_LINES] + content[-EDGE_LINES:])
    return [
        line for i, line in enumerate(lines)
        if not (i in edge and (_edge_key(line) in repeated or _PAGE_NUMBER.match(line.strip())))
    ]


def _join_paragraphs(lines: list[str]) -> str:
    """Rejoin visual lines into paragraphs and collapse runs of spaces (layout alignment) to one.

    A new paragraph starts after a blank or short line, at a bullet, or where the indentation changes —
    except on a paragraph's second line, which may sit left of a first-line indent or right of a bullet
    (hanging indent).
    """
    widths = sorted(len(line.strip()) for line in lines if line.strip())
    full_width = widths[int(len(widths) * 0.8)] if widths else 0
    paragraphs: list[str] = []
    current, current_lines, previous_indent, previous_short = "", 0, 0, True
    for line in lines:
        text = " ".join(line.split())
        if not text:
            if current:
                paragraphs.append(current)
            current, current_lines, previous_short = "", 0, True
            continue
        indent = len(line) - len(line.lstrip(" "))
        indent_changed = abs(indent - previous_indent) >= 2 and current_lines > 1
        if current and (previous_short or _BULLET.match(text) or indent_changed):
            paragraphs.append(current)
            current, current_lines = "", 0
        current = _join_line(current, text)
        current_lines += 1
        previous_indent, previous_short = indent, len(text) < 0.6 * full_width
    if current:
        paragraphs.append(current)
    return "\n\n".join(paragraphs)


def _join_line(current: str, text: str) -> str:
    if not current:
        return text
    if current.endswith("-") and len(current) > 1 and current[-2].isalpha() and text[:1].islower():
        return current + text  # a compound cut at its hyphen: "forward-" + "looking"
    return f"{current} {text}"


def _read_text_file(path: Path) -> list[tuple[int, str]]:
    raw = path.read_bytes()
    if not raw.strip():
        raise DocumentError(f"{path}: empty file; skipped. Remove it or add its content.")
    try:
        text = decode_utf8(raw, path)
    except NotUtf8Error as err:
        raise DocumentError(f"{err} Until then it is skipped.") from None
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        text = _html_text(text)
    elif suffix in (".md", ".markdown"):
        text = _markdown_text(text)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", _normalize(text))]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise DocumentError(f"{path}: no text after removing markup; skipped.")
    return list(enumerate(_regions(paragraphs), start=1))


def _html_text(html: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg"]):
        tag.decompose()
    blocks = "p div section article li h1 h2 h3 h4 h5 h6 tr br pre blockquote table ul ol".split()
    for tag in soup.find_all(blocks):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    return soup.get_text(" ")


def _markdown_text(text: str) -> str:
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # images
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = re.sub(r"^(#{1,6})\s*(.+)$", r"\n\2\n", text, flags=re.MULTILINE)  # a heading is its own paragraph
    return text


def _regions(paragraphs: list[str]) -> list[str]:
    regions: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        if current and size + len(paragraph) > REGION_CHARS:
            regions.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph)
    if current:
        regions.append("\n\n".join(current))
    return regions
