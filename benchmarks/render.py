"""Copy benchmark tables from benchmarks/results/*.md into README.md between markers
``<!-- bench:SUITE -->`` and ``<!-- /bench:SUITE -->``."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for result in sorted((ROOT / "benchmarks" / "results").glob("*.md")):
        suite = result.stem
        pattern = re.compile(rf"(<!-- bench:{suite} -->\n).*?(<!-- /bench:{suite} -->)", re.S)
        text, count = pattern.subn(lambda m, r=result: m.group(1) + r.read_text() + m.group(2),
                                   text)
        print(f"{suite}: {'updated' if count else 'no markers in README'}")
    readme.write_text(text)


if __name__ == "__main__":
    main()
