"""Plain-text documents out of the packaged texts that Debian ships.

Each reader takes the extracted package trees (`{package: root}`) and yields
`(document name, text)`: one document per natural unit (a book of the Bible,
a novel, a source file of the docs, the dictionary entries of one initial),
so that a held-out split can take whole documents. Markup is stripped, the
prose and code are kept. `tequila_jax.data.corpora` runs them once and
caches the documents as `.txt` files.
"""

from __future__ import annotations

import gzip
import html.parser
import pathlib
import re
import subprocess
import warnings
import zlib
from typing import Callable, Iterator

from tequila_jax.errors import ExpectedError

Documents = Iterator[tuple[str, str]]


class TextError(ExpectedError, RuntimeError):
  pass


def _doc_root(roots: dict, package: str) -> pathlib.Path:
  return roots[package] / "usr" / "share" / "doc" / package


def _squeeze(text: str) -> str:
  """Trailing spaces off, runs of blank lines to one, ends with a newline."""
  lines = [line.rstrip() for line in text.splitlines()]
  out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
  return out + "\n" if out else ""


# --------------------------------------------------------------------------
# reStructuredText (the Linux and Python documentation)
# --------------------------------------------------------------------------

# Directives whose body is markup or bookkeeping, not text: dropped whole.
_DROP_BODY = {"toctree", "index", "testsetup", "testcleanup", "kernel-doc",
              "kernel-abi", "kernel-feat", "kernel-include", "include",
              "literalinclude", "image", "figure", "raw", "only", "tabularcolumns",
              "highlight", "module", "moduleauthor", "sectionauthor",
              "currentmodule", "audit-event", "audit-event-table", "impl-detail",
              "c:namespace", "c:namespace-push", "c:namespace-pop", "contents", "sectnum", "default-role",
              "program", "opcode", "pdbcommand", "maintainers-include",
              "productionlist", "cssclass", "rst-class", "role", "meta",
              "seealso", "availability", "flat-table", "list-table"}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+_.:<>])\1{2,}\s*$")
_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")  # :func:`name`
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`_{1,2}")
_LITERAL = re.compile(r"``([^`]+)``")
_REF = re.compile(r"`([^`]+)`_{1,2}")
_EMPH = re.compile(r"(\*\*|\*)(\S(?:.*?\S)?)\1")


_VERSIONS = {"versionadded": "New in version", "versionchanged":
             "Changed in version", "deprecated": "Deprecated since version",
             "deprecated-removed": "Deprecated since version"}


def _role_text(match) -> str:
  role, text = match.group(0).split(":`", 1)[0].strip(":"), match.group(1)
  if role in ("rfc", "pep"):
    return f"{role.upper()} {text}"
  shown = re.match(r"^(.*?)\s*<[^>]*>$", text)  # :ref:`words <label>`
  if shown and shown.group(1):
    return shown.group(1)
  if text.startswith("~"):  # :func:`~a.b` shows b
    return text[1:].rsplit(".", 1)[-1]
  return text.lstrip("!")  # ! suppresses the link


def _inline(line: str) -> str:
  line = _ROLE.sub(_role_text, line)
  line = _LINK.sub(r"\1", line)
  line = _LITERAL.sub(r"\1", line)
  line = _REF.sub(r"\1", line)
  line = _EMPH.sub(r"\2", line)
  return line.replace("\\ ", "")


def strip_rst(text: str) -> str:
  """reStructuredText to plain text: directives with bookkeeping bodies
  (toctree, index, kernel-doc, ...) and comments dropped with their indented
  bodies, directive options dropped, other directives (note, code-block,
  function signatures) reduced to their argument and body, section
  underlines dropped, inline roles / links / literals / emphasis reduced to
  their text. Code samples stay as they are."""
  out: list[str] = []
  skip_indent = -1  # inside a dropped block: lines indented more than this
  in_options = False
  for line in text.splitlines():
    indent = len(line) - len(line.lstrip())
    if skip_indent >= 0:
      if not line.strip() or indent > skip_indent:
        continue
      skip_indent = -1
    if in_options:
      if re.match(r"^\s+:[\w -]+:", line):
        continue
      in_options = False
    directive = _DIRECTIVE.match(line)
    if directive:
      name, arg = directive.group(2), directive.group(3)
      if name in _DROP_BODY or name.startswith("c:") and not arg:
        skip_indent = indent
        continue
      in_options = True
      if name in _VERSIONS:
        arg = f"{_VERSIONS[name]} {arg}:"
      if arg:
        out.append(" " * indent + _inline(arg))
      continue
    if _COMMENT.match(line):  # a comment, label or substitution definition
      skip_indent = indent
      continue
    if _UNDERLINE.match(line):
      continue
    out.append(_inline(line))
  return _squeeze("\n".join(out))


def _rst_files(files: list[pathlib.Path], top: pathlib.Path) -> Documents:
  for path in files:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="strict") as f:
      raw = f.read()
    text = strip_rst(raw)
    if text.strip():
      yield str(path.relative_to(top)).removesuffix(".gz"), text


def linux_docs(roots: dict) -> Documents:
  """The kernel's Documentation/ (reStructuredText and .txt) in English:
  translations/ and the devicetree bindings (property lists) left out."""
  top = _doc_root(roots, "linux-doc-6.12") / "Documentation"
  files = sorted(p for p in top.rglob("*.gz")
                 if p.name.endswith((".rst.gz", ".txt.gz"))
                 and p.relative_to(top).parts[0] != "translations"
                 and "devicetree" not in p.relative_to(top).parts)
  yield from _rst_files(files, top)


def python_docs(roots: dict) -> Documents:
  """The Python 3.11 documentation's reStructuredText sources."""
  top = (_doc_root(roots, "python3.11-doc").parent / "python3.11" / "html"
         / "_sources")
  yield from _rst_files(sorted(top.rglob("*.rst.txt")), top)


# --------------------------------------------------------------------------
# The King James Bible (the bible program reads its compressed text)
# --------------------------------------------------------------------------

def bible_kjv(roots: dict) -> Documents:
  """The 66 books, one document each, through the reader the `bible-kjv`
  package ships (the `bible-kjv-text` data file is in its own compressed
  format). Verse numbers are dropped; each chapter is a paragraph."""
  program = roots["bible-kjv"] / "usr" / "bin" / "bible"
  data = roots["bible-kjv-text"] / "usr" / "lib"
  proc = subprocess.run([str(program), "-p", str(data), "-l", "1000000",
                         "gen1:1-rev22:21"], capture_output=True, text=True)
  if proc.returncode or not proc.stdout.strip():
    raise TextError(f"the bible-kjv reader failed (exit {proc.returncode}): "
                    f"{proc.stderr.strip()[-300:]}")
  books: dict[str, list[str]] = {}
  book, verses = None, []
  for line in proc.stdout.splitlines():
    heading = re.match(r"^(\S.*?) (\d+)$", line)
    if heading:  # "Genesis 1", "1 Kings 3"; verses are indented, one a line
      if book is not None:
        books.setdefault(book, []).append(" ".join(verses))
      book, verses = heading.group(1), []
      continue
    line = re.sub(r"^\s*\d+ ", "", line).strip()
    if line:
      verses.append(line)
  if book is not None:
    books.setdefault(book, []).append(" ".join(verses))
  if len(books) != 66:
    raise TextError(f"expected the 66 books of the Bible, read {len(books)}.")
  for name, chapters in books.items():
    yield name, _squeeze(f"{name}\n\n" + "\n\n".join(chapters))


# --------------------------------------------------------------------------
# Jane Austen's novels (an R lazy-load database)
# --------------------------------------------------------------------------

def read_lazyload(stem: pathlib.Path) -> dict:
  """The objects of an R lazy-load database (`stem.rdx` + `stem.rdb`), as
  the `rdata` package converts them: the index is a gzip-compressed
  serialization naming each object's (offset, length) in the .rdb, whose
  blocks are a 4-byte big-endian length and zlib-compressed serializations."""
  try:
    import rdata  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TextError("reading R data needs the `rdata` package: "
                    "pip install 'tequila_jax[corpus]'") from e
  with warnings.catch_warnings():  # rdata warns that it "assumed RDS"
    warnings.simplefilter("ignore")
    index = rdata.conversion.convert(rdata.parser.parse_data(
        gzip.decompress(stem.with_suffix(".rdx").read_bytes())))
    blob = stem.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
      block = blob[int(offset):int(offset) + int(length)]
      raw = zlib.decompress(block[4:])
      if len(raw) != int.from_bytes(block[:4], "big"):
        raise TextError(f"{stem}.rdb: object {name} has the wrong length.")
      objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
  return objects


AUSTEN_TITLES = {"emma": "Emma", "mansfieldpark": "Mansfield Park",
                 "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion",
                 "prideprejudice": "Pride and Prejudice",
                 "sensesensibility": "Sense and Sensibility"}


def austen(roots: dict) -> Documents:
  """Six novels, one document each: janeaustenr's line vectors, with the
  hard line breaks inside paragraphs joined."""
  stem = (roots["r-cran-janeaustenr"] / "usr" / "lib" / "R" / "site-library"
          / "janeaustenr" / "data" / "Rdata")
  objects = read_lazyload(stem)
  for key, title in AUSTEN_TITLES.items():
    lines = [str(x) for x in objects[key]]
    paragraphs, current = [], []
    for line in lines + [""]:
      if line.strip():
        current.append(line.strip())
      elif current:
        paragraphs.append(" ".join(current))
        current = []
    yield title, _squeeze("\n\n".join(paragraphs))


# --------------------------------------------------------------------------
# GCIDE (dictd) and the Jargon File
# --------------------------------------------------------------------------

_BRACES = str.maketrans("", "", "{}")


def gcide(roots: dict) -> Documents:
  """The Collaborative International Dictionary of English, one document per
  two-letter headword prefix ("Ab", "Ac", ...). dictd's pronunciation marks
  (\\Ab*do"men\\) and the "[1913 Webster]" source lines are dropped."""
  path = roots["dict-gcide"] / "usr" / "share" / "dictd" / "gcide.dict.dz"
  with gzip.open(path, "rb") as f:  # UTF-8 but for 3 cp1252 bytes
    text = f.read().decode("utf-8", errors="replace").replace("\ufffd", "'")
  groups: dict[str, list[str]] = {}
  for entry in re.split(r"\n\n(?=\S)", text):
    head = entry.split("\n", 1)[0]
    if head.startswith("00-database") or not head[:1].isalpha():
      continue
    entry = re.sub(r"^\s*\[[^\]\n]*\]\s*$", "", entry, flags=re.M)
    entry = re.sub(r"\\[^\\\n]*\\", "", entry, count=1)  # the pronunciation
    body = " ".join(line.strip() for line in entry.splitlines() if line.strip())
    body = re.sub(r" +,", ",", re.sub(r"\s{2,}", " ", body.translate(_BRACES)))
    groups.setdefault(head[:2].strip().capitalize(), []).append(body)
  for prefix in sorted(groups):
    yield prefix, "\n".join(groups[prefix]) + "\n"


def jargon(roots: dict) -> Documents:
  """The Jargon File 4.4.7: each chapter and appendix one document, the
  glossary one document per initial; {cross-references} lose their braces."""
  path = _doc_root(roots, "jargon-text") / "jargon.txt.gz"
  with gzip.open(path, "rt", encoding="utf-8") as f:
    text = f.read().replace("\u00a0", " ")  # headings use no-break spaces
  lines = text.translate(_BRACES).splitlines()
  starts = [i for i, line in enumerate(lines)
            if re.match(r"^(Chapter \d+\.|Appendix [A-Z]\.|Glossary$)", line)]
  for a, b in zip(starts, starts[1:] + [len(lines)]):
    title = lines[a]
    if title != "Glossary":
      yield title, _squeeze("\n".join(lines[a:b]))
      continue
    by_initial: dict[str, list[str]] = {}
    entry_lines = lines[a:b]
    first = next(i for i, line in enumerate(entry_lines)
                 if re.match(r"^   :.+:", line))
    current = None
    for line in entry_lines[first:]:
      head = re.match(r"^   :(.+?):", line)
      if head:
        initial = head.group(1)[0].upper()
        current = by_initial.setdefault(initial if initial.isalpha() else "#", [])
        line = head.group(1) + ":" + line[head.end():]
      if current is not None:
        current.append(line.strip())
    for initial in sorted(by_initial):
      yield f"Glossary {initial}", _squeeze("\n".join(by_initial[initial]))


# --------------------------------------------------------------------------
# Perl's POD and PostgreSQL's HTML manual
# --------------------------------------------------------------------------

_POD_CODE = re.compile(r"[BICFSL]<<+\s(.*?)\s>>+|([BICFSXZEL])<([^<>]*)>")
_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _pod_inline(text: str) -> str:
  def code(m):
    if m.group(1) is not None:  # C<< $a <=> $b >>
      return m.group(1)
    kind, body = m.group(2), m.group(3)
    if kind in "XZ":  # index entries, null
      return ""
    if kind == "E":
      return _POD_ENTITIES.get(body, chr(int(body)) if body.isdigit() else "")
    if kind == "L":
      return body.split("|", 1)[0] if "|" in body else body.split("/")[-1].strip('"')
    return body
  for _ in range(4):  # nested codes: B<C<x>>
    text, n = _POD_CODE.subn(code, text)
    if not n:
      break
  return text


def strip_pod(text: str) -> str:
  """Perl POD to plain text: headings kept as lines, `=item` as bullets,
  =begin/=for blocks and =over/=back/=cut dropped, formatting codes
  reduced to their text (X<> index entries dropped)."""
  out, skipping = [], False
  for para in re.split(r"\n\s*\n", text):
    if skipping:
      skipping = not para.startswith("=end")
      continue
    if para.startswith("=begin"):
      skipping = True
      continue
    if para.startswith("="):
      command, _, rest = para.partition(" ")
      if command in ("=head1", "=head2", "=head3", "=head4"):
        out.append(_pod_inline(rest.strip()))
      elif command == "=item":
        out.append(_pod_inline(rest.strip().lstrip("* ").strip() or "*"))
      continue  # =over =back =cut =pod =for =encoding
    out.append(para if para[:1].isspace() else _pod_inline(para))
  return _squeeze("\n\n".join(out))


def perl_docs(roots: dict) -> Documents:
  """Perl 5.36's manual pages (pod/*.pod), one document each."""
  top = roots["perl-doc"] / "usr" / "share" / "perl"
  for path in sorted(top.rglob("*.pod")):
    text = strip_pod(path.read_text(encoding="utf-8", errors="strict"))
    if text.strip():
      yield path.stem, text


class _HtmlText(html.parser.HTMLParser):
  """Text of an HTML page: block elements as line breaks, <pre> verbatim,
  navigation (navheader/navfooter), script and style dropped."""

  BLOCKS = {"p", "div", "h1", "h2", "h3", "h4", "h5", "li", "dt", "dd", "tr",
            "pre", "table", "br", "blockquote"}

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.parts: list[str] = []
    self.skip = 0  # depth inside dropped elements
    self.pre = 0

  def handle_starttag(self, tag, attrs):
    cls = dict(attrs).get("class") or ""
    if self.skip or tag in ("script", "style", "head") or cls in (
        "navheader", "navfooter"):
      self.skip += tag not in ("br", "hr", "img", "meta", "link")
      return
    if tag == "pre":
      self.pre += 1
    if tag in self.BLOCKS:
      self.parts.append("\n\n" if tag != "br" else "\n")

  def handle_endtag(self, tag):
    if self.skip:
      self.skip -= 1
      return
    if tag == "pre":
      self.pre -= 1
    if tag in self.BLOCKS:
      self.parts.append("\n\n")

  def handle_data(self, data):
    if not self.skip:
      self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_text(page: str) -> str:
  parser = _HtmlText()
  parser.feed(page)
  text = "".join(parser.parts)
  return _squeeze("\n".join(line.strip() if not line[:1].isspace() or
                             len(line) - len(line.lstrip()) < 2 else line
                             for line in text.splitlines()))


def postgresql_docs(roots: dict) -> Documents:
  """The PostgreSQL 15 manual, one document per HTML page."""
  top = _doc_root(roots, "postgresql-doc-15") / "html"
  for path in sorted(top.glob("*.html")):
    text = html_text(path.read_text(encoding="utf-8"))
    if len(text) > 200:  # index and navigation pages
      yield path.stem, text


READERS: dict[str, Callable[[dict], Documents]] = {
    "linux_docs": linux_docs, "python_docs": python_docs,
    "bible_kjv": bible_kjv, "austen": austen, "gcide": gcide,
    "jargon": jargon, "perl_docs": perl_docs,
    "postgresql_docs": postgresql_docs}
