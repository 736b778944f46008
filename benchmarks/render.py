"""Copy benchmark tables from benchmarks/results/*.md into README.md between markers
``<!-- bench:SUITE -->`` and ``<!-- /bench:SUITE -->``, and the plots (results/*.png) into docs/,
where the README shows them."""

from __future__ import annotations

import re
import shutil
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
    for plot in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(plot, ROOT / "docs" / plot.name)
        print(f"{plot.name}: copied to docs/")


if __name__ == "__main__":
    main()
