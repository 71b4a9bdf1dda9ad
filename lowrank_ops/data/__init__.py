"""Text for calibration and evaluation, and its cutting into token windows.

The default text is a committed slice of English Wikipedia (96 articles, plain prose, CC BY-SA 3.0; see
`wikipedia/ATTRIBUTION.md`), derived by `scripts/extract_wikipedia.py` from the excerpt inside the gensim==4.4.0
wheel. Calibration and test text are split BY ARTICLE, so no article contributes to both.

    from lowrank_ops.data import tokenize_to_sequences, wikipedia_split

    texts = [a["text"] for a in wikipedia_split("test")]
    windows = tokenize_to_sequences(tokenizer, texts, seq_len=512)   # LongTensor (N, 512)
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = [
    "CODE_SPLITS",
    "SPLITS",
    "TEST_FRACTION",
    "python_stdlib_split",
    "text_files",
    "tokenize_to_sequences",
    "wikipedia_articles",
    "wikipedia_split",
]

SPLITS = ("calibration", "test")
TEST_FRACTION = 0.2
_ARTICLES = "wikipedia/articles.jsonl.gz"


@functools.lru_cache(maxsize=1)
def _load_articles() -> tuple[tuple[str, str], ...]:
    resource = importlib.resources.files(__name__).joinpath(_ARTICLES)
    if not resource.is_file():
        raise FileNotFoundError(
            f"wikipedia_articles: {_ARTICLES} is missing from the lowrank_ops.data package; regenerate it with "
            "`python scripts/extract_wikipedia.py gensim-4.4.0-*.whl` or reinstall lowrank-ops"
        )
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return tuple((a["title"], a["text"]) for a in map(json.loads, f))


def wikipedia_articles() -> list[dict]:
    """All articles of the committed Wikipedia slice, in dump order: [{"title": str, "text": str}, ...].

    The text is plain prose: paragraphs and headings separated by single newlines, no markup."""
    return [{"title": title, "text": text} for title, text in _load_articles()]


def _article_key(title: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\0{title}".encode()).digest()


def wikipedia_split(split: str, seed: int = 0) -> list[dict]:
    """The articles of one split, in dump order. Deterministic and by article: the articles are ranked by
    sha256(f"{seed}\\0{title}") and the first round(TEST_FRACTION * n) of that ranking (20%) form "test", the rest
    "calibration". The two splits are disjoint and together hold every article; another seed draws another split."""
    if split not in SPLITS:
        raise ValueError(f"wikipedia_split: split={split!r} must be one of {SPLITS}")
    if not isinstance(seed, int):
        raise TypeError(f"wikipedia_split: seed={seed!r} must be an int")
    articles = wikipedia_articles()
    ranked = sorted(range(len(articles)), key=lambda i: _article_key(articles[i]["title"], seed))
    test = set(ranked[: round(TEST_FRACTION * len(articles))])
    return [a for i, a in enumerate(articles) if (i in test) == (split == "test")]


CODE_SPLITS = {"calibration": 0.5, "train": 0.2, "heldout": 0.1, "test": 0.2}
"""Fractions of the Python standard library's files in each split of `python_stdlib_split` (by file, not by token)."""
CODE_MAX_FILE_BYTES = 200_000
"""Files above this size are skipped (pydoc_data/topics.py is 750 kB of help text, not code)."""


def _stdlib_files(root: Path, max_file_bytes: int) -> list[Path]:
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for path in root.rglob("*.py"):
        if skip.intersection(path.relative_to(root).parts) or not path.is_file():
            continue
        if path.stat().st_size > max_file_bytes:
            continue
        files.append(path)
    return files


def python_stdlib_split(
    split: str, seed: int = 0, *, root: str | os.PathLike | None = None, max_file_bytes: int = CODE_MAX_FILE_BYTES
) -> list[dict]:
    """The Python source files of one split of the running interpreter's standard library (a code corpus that is on
    every machine): [{"path": path relative to the stdlib root, "text": str}, ...], ranked by the hash below.

    root: the stdlib directory (default sysconfig.get_paths()["stdlib"]); site-packages, __pycache__, files larger
    than `max_file_bytes`, empty files and files that are not UTF-8 are skipped. Deterministic and BY FILE: files
    are ranked by sha256(f"{seed}\\0{relative path}") and cut into CODE_SPLITS ("calibration" 50%, "train" 20%,
    "heldout" 10%, "test" 20%) in that order, so no file contributes to two splits; the returned order is the
    ranking (a prefix is a random sample, not an alphabetical run of one package)."""
    import sysconfig

    if split not in CODE_SPLITS:
        raise ValueError(f"python_stdlib_split: split={split!r} must be one of {list(CODE_SPLITS)}")
    if not isinstance(seed, int):
        raise TypeError(f"python_stdlib_split: seed={seed!r} must be an int")
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"python_stdlib_split: the standard library directory {root} does not exist")
    files = _stdlib_files(root, max_file_bytes)
    if not files:
        raise FileNotFoundError(f"python_stdlib_split: no .py files under {root}")
    ranked = sorted(files, key=lambda f: _article_key(f.relative_to(root).as_posix(), seed))
    bounds, start = {}, 0.0
    for name, fraction in CODE_SPLITS.items():
        bounds[name] = (round(start * len(ranked)), round((start + fraction) * len(ranked)))
        start += fraction
    lo, hi = bounds[split]
    out = []
    for path in ranked[lo:hi]:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append({"path": path.relative_to(root).as_posix(), "text": text})
    return out


def text_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The contents of user-given UTF-8 text files, one string per file, in the order given.

    Raises FileNotFoundError for a missing path or a directory, ValueError for an empty (or whitespace-only) file,
    a file that is not UTF-8, or no paths at all."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("text_files: no paths given")
    texts = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"text_files: {path} does not exist")
        if not path.is_file():
            raise FileNotFoundError(f"text_files: {path} is not a regular file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"text_files: {path} is not UTF-8 text ({exc})") from None
        if not text.strip():
            raise ValueError(f"text_files: {path} is empty; calibration and evaluation text must hold text")
        texts.append(text)
    return texts


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: a document longer than the model's context is expected here (it is cut into windows)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def tokenize_to_sequences(
    tokenizer, texts: Iterable[str], seq_len: int, max_sequences: int | None = None, add_bos: bool = True
) -> torch.LongTensor:
    """Non-overlapping token windows (N, seq_len), no padding.

    The documents are tokenized without special tokens and concatenated into one stream with the tokenizer's EOS
    token after each document: doc0 EOS doc1 EOS ... The stream is cut into consecutive chunks; with `add_bos`
    (default) and a tokenizer that has a BOS token, each window is [BOS] + the next seq_len - 1 stream tokens
    (the evaluation protocol: every window starts like a fresh context), otherwise seq_len stream tokens. The
    incomplete tail is dropped, so N may be 0 when the text is shorter than one window. At most `max_sequences`
    windows are returned (documents past what they need are not tokenized).

    `tokenizer` is any Hugging Face tokenizer (called as tokenizer(text, add_special_tokens=False, verbose=False))
    with an `eos_token_id` (or, failing that, a `bos_token_id` to join documents with).
    """
    if isinstance(texts, str):
        raise TypeError("tokenize_to_sequences: texts must be a list of documents, not one str")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"tokenize_to_sequences: seq_len={seq_len!r} must be an int >= 2")
    if max_sequences is not None and (not isinstance(max_sequences, int) or max_sequences < 1):
        raise ValueError(f"tokenize_to_sequences: max_sequences={max_sequences!r} must be None or an int >= 1")
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    separator = getattr(tokenizer, "eos_token_id", None)
    if separator is None:
        separator = getattr(tokenizer, "bos_token_id", None)
    if separator is None:
        raise ValueError("tokenize_to_sequences: the tokenizer has neither eos_token_id nor bos_token_id to join "
                         "documents with")  # fmt: skip
    chunk = seq_len - 1 if bos is not None else seq_len
    needed = None if max_sequences is None else max_sequences * chunk
    stream: list[int] = []
    documents = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"tokenize_to_sequences: document {documents} is a {type(text).__name__}, not a str")
        documents += 1
        stream.extend(_encode(tokenizer, text))
        stream.append(separator)
        if needed is not None and len(stream) >= needed:
            break
    if documents == 0:
        raise ValueError("tokenize_to_sequences: no documents given")
    n = len(stream) // chunk
    if max_sequences is not None:
        n = min(n, max_sequences)
    body = torch.tensor(stream[: n * chunk], dtype=torch.long).view(n, chunk)
    if bos is None:
        return body
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), body], dim=1)
