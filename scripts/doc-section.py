#!/usr/bin/env python3
"""Replace one script-owned section of a Markdown document, keeping everything else.

    scripts/doc-section.py DOC NAME CONTENT_FILE

The section is the text between `<!-- NAME begin -->` and `<!-- NAME end -->`. Several scripts
(scripts/bench.sh, scripts/bench-browser.sh) and people write docs/PERFORMANCE.md, so each script
rewrites only its own markers: nothing outside them is touched. Without the markers yet, the
section is appended at the end (after a `# Performance`-style title if the document is new).
"""
import pathlib
import sys


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    doc, name, content_file = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
    begin, end = f"<!-- {name} begin -->", f"<!-- {name} end -->"
    block = f"{begin}\n{content_file.read_text().strip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    elif begin in text or end in text:
        print(f"{doc}: unbalanced markers for {name}; fix them by hand", file=sys.stderr)
        return 1
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
