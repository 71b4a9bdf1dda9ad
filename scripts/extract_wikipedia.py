"""Derive the committed Wikipedia text slice (lowrank_ops/data/wikipedia/) from the excerpt inside the gensim wheel.

Source: the MediaWiki XML excerpt shipped as a test fixture in the PyPI wheel gensim==4.4.0, member
`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2` (English Wikipedia,
April 2016 revisions, text under CC BY-SA 3.0). Get the wheel with

    python -m pip download --no-deps gensim==4.4.0 -d /tmp/dl

and run (from the repository root)

    python scripts/extract_wikipedia.py /tmp/dl/gensim-4.4.0-*.whl

Only the standard library is used, and the output is byte-for-byte reproducible (gzip without a timestamp or
file name, articles in dump order).

Kept: pages of namespace 0 that are not redirects and not disambiguation pages. Each page's wikitext becomes plain
prose: comments, <ref>s, templates {{...}} (nested), tables {| ... |}, File/Image/Category/interlanguage links and
the content of non-prose tags (<math>, <gallery>, ...) are dropped; [[target|text]] keeps `text`, [[target]] keeps
`target`; [url label] keeps `label`; bold/italic quotes and list markers are removed; a heading keeps its text on a
line of its own; reference-only sections (References, External links, See also, ...) are dropped; whitespace is
collapsed (paragraphs are separated by one newline). Articles with fewer than MIN_CHARS characters are dropped.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import html
import io
import json
import os
import re
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WHEEL = "gensim==4.4.0"
OUT_DIR = Path(__file__).resolve().parents[1] / "lowrank_ops" / "data" / "wikipedia"
ARTICLES = "articles.jsonl.gz"
ATTRIBUTION = "ATTRIBUTION.md"
MIN_CHARS = 1000  # shorter articles are stubs or lists, not prose

# Sections holding citations and link lists rather than prose: dropped with everything under them.
DROPPED_SECTIONS = {
    "references", "notes", "footnotes", "citations", "sources", "bibliography", "further reading",
    "external links", "see also", "works cited", "notes and references", "references and notes",
    "primary sources", "secondary sources", "general references", "specific references", "cited sources",
    "explanatory notes", "bibliography and further reading", "other", "links",
}  # fmt: skip
# Tags whose content is not prose (formulas, image galleries, code): dropped with their content.
DROPPED_TAGS = ("math", "gallery", "timeline", "imagemap", "score", "syntaxhighlight", "source", "pre", "chem", "ce",
                "hiero", "graph", "mapframe", "templatedata", "references")  # fmt: skip
# Namespaces and sister projects whose links are not article text ([[File:...]], [[wikt:word]], [[s:Some text]]).
DROPPED_LINK_PREFIXES = (
    "file", "image", "category", "media", "wikipedia", "wp", "wikt", "wiktionary", "help", "template", "portal",
    "special", "user", "talk", "s", "q", "n", "v", "b", "commons",
)  # fmt: skip
LANGUAGE_LINK = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$|^simple$")  # [[de:Anarchismus]], [[zh-min-nan:...]]


def _drop_balanced(text: str) -> str:
    """Remove templates {{...}} and tables {|...|}, nested in any combination.

    A scanner with a stack of open constructs; an opener that is never closed is dropped alone (its two
    characters), so one stray "{{" cannot swallow the rest of an article."""
    out: list[str] = []
    stack: list[tuple[str, int]] = []  # (closing token, position of the opener)
    i, start, n = 0, 0, len(text)
    while True:
        if i >= n:
            if not stack:
                break
            # unclosed opener: drop it alone and rescan from just after it
            _, pos = stack[0]
            stack.clear()
            i = start = pos + 2
            continue
        pair = text[i : i + 2]
        if pair == "{{" or (pair == "{|" and (not stack or stack[-1][0] == "|}")):
            if not stack:
                out.append(text[start:i])
            stack.append(("}}" if pair == "{{" else "|}", i))
            i += 2
        elif stack and pair == stack[-1][0]:
            stack.pop()
            i += 2
            if not stack:
                start = i
        else:
            i += 1
    out.append(text[start:])
    return "".join(out)


def _link_text(inner: str) -> str:
    """Visible text of the link [[inner]] ('' for files, categories, interlanguage and other non-article links)."""
    target, _, label = inner.partition("|")
    prefix, colon, _ = target.strip().lstrip(":").partition(":")
    if colon and (prefix.strip().lower() in DROPPED_LINK_PREFIXES or LANGUAGE_LINK.match(prefix.strip())):
        return ""
    if label:
        return label.rsplit("|", 1)[-1]
    return target.split("#")[0] if not target.startswith("#") else target[1:]


def _replace_links(text: str) -> str:
    """Replace [[...]] links (captions of File links may hold nested links) by their visible text."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        j = text.find("[[", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        depth, k = 0, j
        while k < n:
            if text.startswith("[[", k):
                depth += 1
                k += 2
            elif text.startswith("]]", k):
                depth -= 1
                k += 2
                if depth == 0:
                    break
            else:
                k += 1
        if depth != 0:  # unclosed: drop the brackets and keep going
            i = j + 2
            continue
        inner = text[j + 2 : k - 2]
        out.append(_replace_links(_link_text(inner)))
        i = k
    return "".join(out)


def _drop_sections(text: str) -> str:
    """Drop each heading in DROPPED_SECTIONS together with its body (up to the next heading of the same or a
    higher level)."""
    lines = text.split("\n")
    kept: list[str] = []
    dropping_level = 0
    for line in lines:
        m = re.match(r"^(=+)\s*(.*?)\s*\1\s*$", line)
        if m:
            level = len(m.group(1))
            if dropping_level and level > dropping_level:
                continue
            dropping_level = 0
            if m.group(2).strip().lower().rstrip(":") in DROPPED_SECTIONS:
                dropping_level = level
                continue
        if not dropping_level:
            kept.append(line)
    return "\n".join(kept)


def wikitext_to_text(wikitext: str) -> str:
    """Plain prose from MediaWiki markup (see the module docstring for what is kept)."""
    text = re.sub(r"<!--.*?(?:-->|$)", "", wikitext, flags=re.DOTALL)
    text = re.sub(r"<ref\b[^>]*/\s*>", "", text, flags=re.IGNORECASE)
    text = re.sub(r"<ref\b[^>]*>.*?</ref\s*>", "", text, flags=re.IGNORECASE | re.DOTALL)
    for tag in DROPPED_TAGS:
        text = re.sub(rf"<{tag}\b[^>]*/\s*>", "", text, flags=re.IGNORECASE)
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = _drop_balanced(text)
    text = _drop_sections(text)
    text = _replace_links(text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"</?[a-zA-Z][^<>]*>", "", text)  # any other tag: keep its content
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]*\]", "", text)  # [url] -> ''
    text = re.sub(r"'{2,}", "", text)  # bold / italic
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__ and other magic words
    text = html.unescape(text).replace("\u00a0", " ")
    entries: list[tuple[int, str]] = []  # (heading level or 0, line)
    for line in text.split("\n"):
        heading = re.match(r"^(=+)\s*(.*?)\s*\1\s*$", line)
        level = len(heading.group(1)) if heading else 0
        if heading:
            line = heading.group(2)
        elif re.match(r"^\s*-{4,}\s*$", line):  # horizontal rule
            continue
        else:
            line = re.sub(r"^[*#:;]+\s*", "", line)  # list and indentation markers
        line = re.sub(r"[ \t]+", " ", line)
        line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)  # "( )" left behind by dropped templates
        line = re.sub(r"\(\s*[,;]\s*", "(", line)
        line = re.sub(r" +([,.;:!?)])", r"\1", line)
        line = re.sub(r"\( +", "(", line)
        line = re.sub(r"[ \t]+", " ", line).strip()
        if line and not re.fullmatch(r"[\W_]+", line):
            entries.append((level, line))
    # a heading with no prose under it (followed by a heading of the same or a higher level, or by the end) goes
    kept: list[str] = []
    next_level = 1  # level of the next kept heading; 1 stands for "the end"
    for level, line in reversed(entries):
        if level and next_level and next_level <= level:
            continue
        kept.append(line)
        next_level = level
    return "\n".join(reversed(kept))


def iter_pages(xml_bytes: bytes):
    """(title, namespace, is_redirect, wikitext) of each <page> of a MediaWiki XML export."""
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes), events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
        revision = fields.get("revision")
        text_elem = None
        if revision is not None:
            text_elem = next((c for c in revision if c.tag.rsplit("}", 1)[-1] == "text"), None)
        yield (
            fields["title"].text or "",
            int(fields["ns"].text),
            "redirect" in fields,
            (text_elem.text or "") if text_elem is not None else "",
        )
        elem.clear()


def is_disambiguation(title: str, wikitext: str) -> bool:
    return title.endswith("(disambiguation)") or bool(
        re.search(r"\{\{\s*(disambiguation|disambig|dab|geodis|hndis|surname)\s*[|}]", wikitext, re.IGNORECASE)
    )


def extract(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as zf:
        if MEMBER not in zf.namelist():
            raise SystemExit(f"extract_wikipedia: {wheel} has no member {MEMBER}; is it the {WHEEL} wheel?")
        xml_bytes = bz2.decompress(zf.read(MEMBER))
    articles = []
    for title, ns, redirect, wikitext in iter_pages(xml_bytes):
        if ns != 0 or redirect or is_disambiguation(title, wikitext):
            continue
        text = wikitext_to_text(wikitext)
        if len(text) >= MIN_CHARS:
            articles.append({"title": title, "text": text})
    return articles


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def attribution(wheel: Path, articles: list[dict]) -> str:
    titles = ", ".join(a["title"] for a in articles)
    chars = sum(len(a["text"]) for a in articles)
    return f"""# Wikipedia text slice: source and licence

`{ARTICLES}` holds {len(articles)} English Wikipedia articles ({chars:,} characters of plain text), one JSON
object per line: `{{"title": ..., "text": ...}}`. It is the default calibration and evaluation text of lowrank-ops.

- **Authors:** Wikipedia contributors. The history of each article, and so its list of authors, is at
  `https://en.wikipedia.org/w/index.php?title=<title>&action=history`.
- **Licence:** [Creative Commons Attribution-ShareAlike 3.0 Unported (CC BY-SA 3.0)](https://creativecommons.org/licenses/by-sa/3.0/)
  (Wikipedia text of this period is also available under the GFDL). This derived file is shared under the same
  licence, CC BY-SA 3.0.
- **Source:** the MediaWiki XML excerpt (revisions of April 2016) shipped inside the PyPI wheel `{WHEEL}`
  (`{wheel.name}`), member `{MEMBER}`. gensim is LGPL-2.1; the excerpt itself is Wikipedia content.
- **Changes:** derived with `scripts/extract_wikipedia.py` (in the lowrank-ops repository): only namespace-0
  articles that are not redirects or disambiguation pages; wikitext converted to plain prose (templates, tables,
  references, comments, file/category/interlanguage links, formulas and reference-only sections such as
  "References" and "External links" removed; link text kept; bold/italic and list markup removed; headings kept
  as lines of their own; whitespace collapsed); articles shorter than {MIN_CHARS} characters dropped.
  Regenerate with `python scripts/extract_wikipedia.py path/to/{wheel.name}`.

Articles: {titles}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=Path, help=f"path of the {WHEEL} wheel (pip download --no-deps {WHEEL})")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    if not args.wheel.is_file():
        parser.error(f"{args.wheel} is not a file; get it with: python -m pip download --no-deps {WHEEL} -d DIR")
    articles = extract(args.wheel)
    lines = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in articles).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(lines)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(args.out_dir / ARTICLES, buf.getvalue())
    _write_atomic(args.out_dir / ATTRIBUTION, attribution(args.wheel, articles).encode("utf-8"))
    size = len(buf.getvalue())
    print(f"{len(articles)} articles, {len(lines):,} bytes of JSON lines, {size:,} bytes gzipped -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
