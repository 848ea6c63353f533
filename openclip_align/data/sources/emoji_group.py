"""The Unicode emoji group of the held-out emoji: an in-domain zero-shot classification set.

Fashion-MNIST and the digits are far from the corpus's pictures; this set asks a model trained on
the emoji pairs to sort the *held-out* emoji pictures (never a training image) into the nine CLDR
emoji groups ("Smileys & Emotion" ... "Flags"). The labels come from ``emoji-test.txt`` of the
Debian package ``unicode-data`` (Unicode, Inc.), which lists every emoji under ``# group:`` and
``# subgroup:`` headers; the "Component" group (bare skin-tone and hair swatches) is not a class.

Matching is by code points with U+FE0F variation selectors removed, as for OpenMoji's file names.
Debian 12 ships emoji-test 15.0 while the font draws Emoji 15.1; every 15.1 sequence extends an
older emoji with a ZWJ component (phoenix = bird + fire, lime = lemon + green, "facing right"
people, head shaking) and CLDR files it in that emoji's group, so an emoji missing from the file
takes the group of its longest prefix ending before a ZWJ that the file lists. The manifest counts
how many labels came from that rule.

Skin-tone variants are left out: each is its default-yellow drawing recoloured, and with all five
tones the full corpus's held-out emoji are 58% "People & Body" (307 of 529), so a model answering
"people and body" to everything would score 58%. Without them the largest class is about 20%.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

from ..packages import Requirement

NAME = "emoji_group"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
LICENCE = ("Unicode-DFS-2016 (group labels: emoji-test.txt of Debian unicode-data, Unicode, Inc.; see "
           "/usr/share/doc/unicode-data/copyright); pictures: the held-out Noto Color Emoji images (OFL-1.1)")
REQUIREMENTS = (
    Requirement("unicode-data", "apt", EMOJI_TEST, "Unicode-DFS-2016", "emoji groups (in-domain zero-shot)"),
)
# the CLDR groups in emoji-test.txt order, without "Component"
GROUPS = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
          "Activities", "Objects", "Symbols", "Flags")
NOT_A_CLASS = ("Component",)
CLASSNAMES = [g.lower().replace(" & ", " and ") for g in GROUPS]
TEMPLATES = ["an emoji of {}.", "a picture from the category {}.", "an emoji from the group {}.",
             "an icon of {}.", "a small picture of {}."]

VS16, ZWJ = 0xFE0F, 0x200D
SKIN_TONES = range(0x1F3FB, 0x1F400)


def key_of(emoji_string: str) -> str:
    """Upper-case hex code points joined by "-", variation selectors U+FE0F removed."""
    return "-".join(f"{ord(c):04X}" for c in emoji_string if ord(c) != VS16)


def parse_emoji_test(text: str) -> Tuple[Dict[str, str], Dict[str, str], Optional[str]]:
    """({key: group}, {key: subgroup}, file version) from the text of an emoji-test.txt."""
    groups: Dict[str, str] = {}
    subgroups: Dict[str, str] = {}
    version = None
    group = subgroup = None
    for line in text.splitlines():
        if line.startswith("#"):
            head, _, value = line[1:].partition(":")
            head, value = head.strip().lower(), value.strip()
            if head == "group":
                if value not in GROUPS and value not in NOT_A_CLASS:
                    raise ValueError(f"emoji-test.txt: unknown emoji group {value!r}")
                group, subgroup = value, None
            elif head == "subgroup":
                subgroup = value
            elif head == "version" and version is None:
                version = value
            continue
        fields, sep, _ = line.partition(";")
        if not sep or not fields.strip() or group is None:
            continue
        key = "-".join(cp for cp in fields.split() if cp.upper() != "FE0F").upper()
        groups.setdefault(key, group)
        subgroups.setdefault(key, subgroup or "")
    return groups, subgroups, version


@functools.lru_cache(maxsize=1)
def _table(path: str = EMOJI_TEST):
    with open(path, encoding="utf-8") as f:
        return parse_emoji_test(f.read())


def table_version() -> Optional[str]:
    try:
        return _table()[2]
    except OSError:
        return None


def group_of(emoji_string: str) -> Tuple[Optional[str], str]:
    """(CLDR group or None, how): how is "exact", "zwj-prefix" (see the module notes) or "none"."""
    groups = _table()[0]
    key = key_of(emoji_string)
    if key in groups:
        return groups[key], "exact"
    parts = key.split("-")
    for end in range(len(parts) - 1, 0, -1):
        if parts[end] == f"{ZWJ:04X}":
            prefix = "-".join(parts[:end])
            if prefix in groups:
                return groups[prefix], "zwj-prefix"
    return None, "none"


def label_rows(pairs: Sequence[Tuple[str, str]]) -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    """(filepath, label) rows for (filepath, emoji string) pairs, in their order, and counts of how.

    Skin-tone variants, emoji without a group and those in a group that is not a class are left out
    (and counted)."""
    rows: List[Tuple[str, int]] = []
    stats = {"exact": 0, "zwj_prefix": 0, "skin_tone_variants": 0, "without_group": 0, "component": 0}
    for path, emoji_string in pairs:
        if any(ord(c) in SKIN_TONES for c in emoji_string):
            stats["skin_tone_variants"] += 1
            continue
        group, how = group_of(emoji_string)
        if group is None:
            stats["without_group"] += 1
        elif group not in GROUPS:
            stats["component"] += 1
        else:
            stats[how.replace("-", "_")] += 1
            rows.append((path, GROUPS.index(group)))
    return rows, stats
