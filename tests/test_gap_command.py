"""``openclip-align gap`` end to end on a small real image-caption CSV (scikit-learn digit scans)."""
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from openclip_align.cli import main

DIGIT_NAMES = "zero one two three four five six seven eight nine".split()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """pairs.csv (filepath, title), cls.csv (filepath, label), classes.json, and two webdataset shards."""
    import webdataset as wds
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("gap_digits")
    (root / "img").mkdir()
    d = load_digits()
    pair_rows, cls_rows = ["filepath\ttitle"], ["filepath\tlabel"]
    for i in range(30):
        pixels = (d.images[i] * 16).clip(0, 255).astype(np.uint8)
        path = root / "img" / f"digit_{i:03d}.png"
        Image.fromarray(pixels).resize((64, 64), Image.NEAREST).save(path)
        pair_rows.append(f"{path}\ta handwritten digit {d.target[i]}")
        cls_rows.append(f"{path}\t{d.target[i]}")
    (root / "pairs.csv").write_text("\n".join(pair_rows) + "\n")
    (root / "cls.csv").write_text("\n".join(cls_rows) + "\n")
    (root / "classes.json").write_text(json.dumps(
        {"classnames": DIGIT_NAMES, "templates": ["a handwritten digit {}.", "the number {}."]}))
    for shard in range(2):
        with wds.TarWriter(str(root / f"train-{shard:06d}.tar")) as sink:
            for i in range(shard * 4, shard * 4 + 4):
                buf = io.BytesIO()
                Image.open(root / "img" / f"digit_{i:03d}.png").convert("RGB").save(buf, format="PNG")
                sink.write({"__key__": f"{i:05d}", "png": buf.getvalue(), "txt": f"a handwritten digit {d.target[i]}",
                            "json": json.dumps({"index": i, "source": "sklearn-digits"}).encode()})
    return root


def strict_json(path):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    with open(path) as fh:
        return json.load(fh, parse_constant=reject)


def assert_png(path):
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.load()
        assert img.width >= 300 and img.height >= 200
        assert np.asarray(img.convert("L")).std() > 1  # something is drawn


def test_gap_command_subprocess_with_zero_shot(digits, tmp_path):
    out = tmp_path / "report"
    lambdas = ["0", "0.25", "0.5", "1"]
    cmd = [sys.executable, "-m", "openclip_align.cli", "gap", "--model", "ViT-S-32",
           "--data", str(digits / "pairs.csv"), "--classes", str(digits / "cls.csv"), "--classnames", str(digits / "classes.json"), "--out", str(out),
           "--limit", "16", "--batch-size", "8", "--device", "cpu", "--lambdas", *lambdas]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "centroid_gap" in proc.stdout and "lambda" in proc.stdout
    assert "embedding pairs" in proc.stderr  # the progress bar

    result = strict_json(out / "gap.json")
    assert result["model"] == "ViT-S-32" and result["n_pairs"] == 16 and result["device"] == "cpu"
    gap = result["gap"]
    for key in ("centroid_gap", "instance_gap", "alignment_score", "alignment", "uniformity_image",
                "uniformity_text", "uniformity_joint", "rmg", "separability", "cone_image", "cone_text",
                "n_pairs", "n_subsampled"):
        assert key in gap, key
    assert 0 <= gap["centroid_gap"] <= 2 and 0 <= gap["instance_gap"] <= 2
    assert gap["alignment"] == pytest.approx(2 - 2 * gap["alignment_score"], abs=1e-9)
    assert 0 < gap["rmg"] <= 1 and 0 <= gap["separability"] <= 1
    assert gap["uniformity_joint"] <= 0 and gap["uniformity_image"] <= 0
    assert gap["n_pairs"] == gap["n_subsampled"] == 16
    # dimensional collapse and the CLIP-Refine convention: 16 centred rows span at most 15 directions
    for side in ("image", "text"):
        assert 1 <= gap[f"effective_rank_{side}"] <= 15 and 0 < gap[f"top2_variance_share_{side}"] <= 1
        assert gap[f"mean_norm_{side}"] > 0          # raw features: ViT-S-32's projection is not unit-norm
    assert gap["centroid_gap_sq_per_dim"] == pytest.approx(gap["centroid_gap"] ** 2 / gap["dim"], rel=1e-9)
    assert gap["centroid_gap_sq_per_dim_raw"] >= 0
    assert set(result["retrieval"]) == {"image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1",
                                        "text_to_image_R@5"}
    zs = result["zero_shot"]
    assert zs["n_images"] == 16 and zs["n_classes"] == 10 and 0 <= zs["top1"] <= zs["top5"] <= 1
    sweep = result["lambda_sweep"]
    assert [row["lambda"] for row in sweep] == [float(x) for x in lambdas]
    assert sweep[0]["centroid_gap"] == pytest.approx(gap["centroid_gap"], rel=1e-9)
    assert sweep[2]["centroid_gap"] < 0.2 * sweep[0]["centroid_gap"]  # lambda = 0.5 closes the gap
    assert sweep[0]["zero_shot_top1"] == pytest.approx(zs["top1"])
    assert all(math.isfinite(row["zero_shot_top5"]) for row in sweep)
    assert set(result["plots"]) == {"pca", "cosine_histograms", "lambda_sweep"}
    for name in result["plots"].values():
        assert_png(out / name)


def test_gap_command_on_shards_in_process(digits, tmp_path, capsys):
    out = tmp_path / "shards"
    rc = main(["gap", "--model", "ViT-S-32", "--data", str(digits / "train-{000000..000001}.tar"), "--out", str(out),
               "--batch-size", "4", "--lambdas", "0", "0.5", "--no-progress"])
    assert rc == 0
    result = strict_json(out / "gap.json")
    assert result["n_pairs"] == 8 and result["zero_shot"] is None
    assert "zero_shot_top1" not in result["lambda_sweep"][0]
    assert "separability" in capsys.readouterr().out
    for name in result["plots"].values():
        assert_png(out / name)


@pytest.mark.parametrize("extra,message", [
    (["--model", "ViT-S-33"], "--model ViT-S-33: no such OpenCLIP model.*ViT-S-32.*list_models"),
    (["--data", "{root}/missing.csv"], "not found"),
    (["--csv-caption-key", "caption"], "no column.*caption"),
    (["--csv-separator", ","], "separator"),
    (["--classes", "{root}/cls.csv"], "--classes and --classnames"),
    (["--classes", "{root}/pairs.csv", "--classnames", "{root}/classes.json", "--csv-label-key", "title"],
     "not an integer"),
    (["--data", "{root}/train-{{000000..000007}}.tar"], "shards not found"),
    (["--limit", "1"], "at least 2"),
])
def test_gap_command_errors(digits, tmp_path, capsys, extra, message):
    import re

    base = {"--model": "ViT-S-32", "--data": str(digits / "pairs.csv"), "--out": str(tmp_path / "o")}
    extra = [e.format(root=digits) for e in extra]
    for flag in list(base):
        if flag in extra:
            del base[flag]
    argv = ["gap", *[x for kv in base.items() for x in kv], *extra, "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("openclip-align gap: error:")
    assert re.search(message, err), err
    assert not (tmp_path / "o" / "gap.json").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gap_command_on_cuda(digits, tmp_path, precision):
    out = tmp_path / precision
    rc = main(["gap", "--model", "ViT-S-32", "--data", str(digits / "pairs.csv"), "--classes", str(digits / "cls.csv"),
               "--classnames", str(digits / "classes.json"), "--out", str(out), "--device", "cuda",
               "--precision", precision, "--batch-size", "16", "--no-progress"])
    assert rc == 0
    result = strict_json(out / "gap.json")
    assert result["device"] == "cuda" and result["n_pairs"] == 30
    assert all(isinstance(v, (int, float)) for v in result["gap"].values())
    assert 0 <= result["zero_shot"]["top1"] <= 1
