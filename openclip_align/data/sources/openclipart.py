"""Open Clip Art Library 0.18 (Debian openclipart-svg, public domain): ~8,000 SVGs whose RDF metadata
carries a title and keywords.

The collection is noisy, so we filter before drawing:

* Whole folders that are not pictures of things (colour gradients, fill patterns, a folder of
  declared duplicates) are skipped.
* Many files share a *collection* title ("gramastar" on 1,375 generated star polygons, "Part of the
  Flat Icon Collection ...", "card"): for those the file name names the picture, and each
  (folder, collection title) group is capped (``group_cap``), keeping evenly spaced members, so no
  family of near-identical drawings dominates.
* After drawing, the builder drops blank renders and near-duplicates (difference hash).

Caption: the title (or the cleaned file name for collection titles) followed by up to four
keywords not already in it: "bored dog, mammal, animal".
"""
from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from xml.etree import ElementTree as ET

from ..packages import Requirement
from . import Item, clean_caption

NAME = "openclipart"
ROOT = Path("/usr/share/openclipart/svg")
LICENCE = "Public domain (Open Clip Art Library; see /usr/share/doc/openclipart-svg/copyright)"
REQUIREMENTS = (
    Requirement("openclipart-svg", "apt", str(ROOT / "animals"), "public domain", "Open Clip Art SVGs"),
    Requirement("cairosvg", "pip", "cairosvg", "LGPL-3.0-or-later", "drawing SVG pictures"),
)
SKIP_DIRS = ("special/gradients", "special/patterns", "unsorted/duplicates")
COLLECTION_MIN = 6            # a title shared by this many files names a collection, not a picture
GROUP_CAP = 8                 # members kept per (folder, collection title)
MAX_KEYWORDS = 4
_NS = {"dc": "http://purl.org/dc/elements/1.1/", "cc": "http://web.resource.org/cc/",
       "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#"}
_GENERIC = {"hash", "icon", "icons", "theme", "computer", "clip art", "clipart", "signs and symbols", "special",
            "shapes", "shape", "magick", "unsorted", "svg", "image", "picture", "clip", "art", "lemon theme icon",
            "media", "inkscape", "openclipart", "various", "misc", "miscellaneous", "remix"}
_BY_PREFIX = re.compile(r"^clip ?art by [^-]+ - ", re.I)


def _metadata(path: Path) -> Tuple[str, List[str], str]:
    """(title, keywords, creator) from the file's RDF block; empty when it has none."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, ValueError):
        return "", [], ""
    work = root.find(".//cc:Work", _NS)
    if work is None:
        return "", [], ""
    title_el = work.find("dc:title", _NS)
    title = clean_caption(title_el.text or "") if title_el is not None else ""
    keywords = [clean_caption(li.text or "") for li in work.findall("dc:subject/rdf:Bag/rdf:li", _NS)]
    creator_el = work.find("dc:creator/cc:Agent/dc:title", _NS)
    creator = clean_caption(creator_el.text or "") if creator_el is not None else ""
    return title, [k for k in keywords if k], creator


def _words(text: str) -> str:
    text = re.sub(r"[_+]+", " ", text)
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)
    text = re.sub(r"\b\d+\b", " ", text)
    return clean_caption(text)


def _name_from_file(stem: str, creator: str = "") -> str:
    """File names often end in the (truncated) author's name: "bullet_hole_linda_kim_r"."""
    author = [w for w in re.split(r"[^a-z]+", creator.lower()) if len(w) >= 2]
    words = []
    for w in _words(stem).lower().split():
        if len(w) < 2 or (len(w) >= 3 and any(a.startswith(w) for a in author)) or w in author:
            continue
        words.append(w)
    return " ".join(words)


def _stem_words(stem: str) -> set:
    return {w[:4] for w in re.split(r"[^a-z]+", stem.lower()) if len(w) >= 3}


def _keyword_ok(kw: str, creator: str) -> bool:
    if not kw or kw in _GENERIC or "theme" in kw or "(" in kw or kw == creator.lower():
        return False
    return not any(len(w) > 20 for w in kw.split())


def make_caption(title: str, keywords: List[str], stem: str, collection: bool, creator: str = "") -> str:
    """Title (or file name) plus up to MAX_KEYWORDS new keywords.

    The title is used when it is not a collection title and shares a word with the file name;
    otherwise the file name names the picture (authors often copied metadata between files: a
    mushroom titled "bee", scissors titled "book").
    """
    named = _words(_BY_PREFIX.sub("", title)) if title else ""
    if collection or not named or not (_stem_words(named) & _stem_words(stem)):
        from_file = _name_from_file(stem, creator)
        named = from_file or named
    seen = set(named.lower().split())
    kept: List[str] = []
    for kw in keywords:
        kw = _words(kw).lower()
        if not _keyword_ok(kw, creator) or kw in kept or set(kw.split()) <= seen:
            continue
        kept.append(kw)
        seen.update(kw.split())
        if len(kept) == MAX_KEYWORDS:
            break
    caption = named if not kept else f"{named}, {', '.join(kept)}"
    return clean_caption(caption)


def _evenly(items: list, k: int) -> list:
    if len(items) <= k:
        return items
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def list_items(options: Optional[dict] = None) -> List[Item]:
    options = options or {}
    cap = int(options.get("group_cap", GROUP_CAP))
    from tqdm.auto import tqdm

    records = []
    paths = sorted(ROOT.rglob("*.svg"))
    for path in tqdm(paths, desc="read openclipart metadata", unit="svg", leave=False,
                     disable=not options.get("progress", False)):
        rel = path.relative_to(ROOT)
        folder = rel.parent.as_posix()
        if any(folder == d or folder.startswith(d + "/") for d in SKIP_DIRS):
            continue
        title, keywords, creator = _metadata(path)
        records.append((path, rel, folder, title, keywords, creator))
    title_counts = collections.Counter(r[3].lower() for r in records if r[3])
    groups: Dict[Tuple[str, str], list] = collections.defaultdict(list)
    for rec in records:
        path, rel, folder, title, keywords, creator = rec
        collection = title_counts[title.lower()] >= COLLECTION_MIN
        caption = make_caption(title, keywords, path.stem, collection, creator)
        if len(re.sub(r"[^A-Za-z]", "", caption)) < 3:
            continue
        group_title = title.lower() if collection else caption.lower()
        groups[(folder, group_title)].append((rel, caption, path, collection))
    items = []
    for (folder, group_title), members in sorted(groups.items()):
        chosen = _evenly(members, cap) if members[0][3] else members
        for rel, caption, path, _ in chosen:
            items.append(Item(source=NAME, uid=rel.as_posix(), caption=caption, spec=str(path),
                              group_keys=(f"group:{folder}|{group_title}", "caption:" + caption.lower()),
                              base_hint=f"{folder}/{group_title}"))
    items.sort(key=lambda it: it.uid)
    return items


def render(item: Item, size: int):
    from ..render import is_blank, render_svg_content, to_square_rgb

    image = to_square_rgb(render_svg_content(item.spec, size), size, crop=True)
    return None if is_blank(image) else image
