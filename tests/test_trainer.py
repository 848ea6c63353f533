"""`python -m open_clip_train.main --loss NAME` end to end on real images (issue 3)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _trainer_launch import BASE, base, logged, train


@pytest.fixture(scope="module")
def embedded_csv(digits_csv, tmp_path_factory):
    """digits csv + row-aligned MiniLM caption embeddings, as `openclip-align embed` writes them."""
    from openclip_align.data.semantic import embed_captions, load_sentence_encoder
    import pandas as pd

    directory = tmp_path_factory.mktemp("embedded")
    csv = directory / "train.csv"
    csv.write_text(digits_csv.read_text())
    captions = pd.read_csv(csv, sep="\t")["title"].tolist()
    np.save(directory / "train.emb.npy", embed_captions(load_sentence_encoder("all-MiniLM-L6-v2"), captions))
    return csv


def imsep_argv(csv):
    return ["--model", "AlignCLIP-Tiny", "--loss", "imsep", "--train-data", str(csv), *BASE]


@pytest.fixture(scope="module")
def imsep_run(embedded_csv, tmp_path_factory):
    """One imsep epoch (batch 16, --semantic-source auto, --val-data) that three tests read: the run itself,
    the precomputed side of the on-the-fly comparison and the whole-batch side of the --accum-freq one
    (validation runs after the epoch, so the logged training steps are those of a run without it)."""
    logs = tmp_path_factory.mktemp("imsep")
    train([*imsep_argv(embedded_csv), "--epochs", "1", "--val-data", str(embedded_csv)], logs, "run")
    return logs / "run"


def test_imsep_trains_logs_both_terms_checkpoints_and_resumes(embedded_csv, imsep_run, tmp_path):
    run = imsep_run
    results = [json.loads(line) for line in (run / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert 0 <= results[-1]["gap/centroid_gap"] <= 2 and "image_to_text_R@1" in results[-1]   # gap metrics live
    assert 1 <= results[-1]["gap/effective_rank_image"] <= 128 and 1 <= results[-1]["gap/effective_rank_text"] <= 128
    # raw-feature statistics of the evaluation pass, against the saved model re-embedding the same pairs
    from openclip_align.evaluation import embed_pairs
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        "AlignCLIP-Tiny", pretrained=str(run / "checkpoints" / "epoch_1.pt"))
    raw_x, raw_y = embed_pairs(model, preprocess, open_clip.get_tokenizer("AlignCLIP-Tiny"), str(embedded_csv),
                               progress=False, normalize=False)
    assert results[-1]["gap/mean_norm_image"] == pytest.approx(raw_x.norm(dim=1).mean().item(), rel=1e-4)
    assert results[-1]["gap/mean_norm_text"] == pytest.approx(raw_y.norm(dim=1).mean().item(), rel=1e-4)
    raw_gap = torch.nn.functional.mse_loss(raw_x.mean(0), raw_y.mean(0)).item()
    assert results[-1]["gap/centroid_gap_sq_per_dim_raw"] == pytest.approx(raw_gap, rel=1e-3, abs=1e-7)
    assert len(logged(run / "out.log", "Contrastive_loss")) == 3        # 48 pairs / batch 16 = 3 steps
    assert len(logged(run / "out.log", "Imsep_loss")) == 3
    assert len(logged(run / "out.log", "Imsep_text_loss")) == 3         # the authors' text side, on by default
    assert "loss: imsep" in (run / "params.txt").read_text()
    checkpoint = torch.load(run / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)
    assert checkpoint["optimizer"]["openclip_align"]["loss"] == "imsep"
    assert checkpoint["optimizer"]["openclip_align"]["options"]["imsep_weight"] == 0.25
    assert checkpoint["optimizer"]["openclip_align"]["options"]["imsep_text"] is True

    resumed = train([*imsep_argv(embedded_csv), "--epochs", "2", "--resume", str(run / "checkpoints" / "epoch_1.pt")],
                    tmp_path, "resumed")
    text = (tmp_path / "resumed" / "out.log").read_text()
    assert "resuming checkpoint" in text and "Start epoch 1" in text
    assert (tmp_path / "resumed" / "checkpoints" / "epoch_2.pt").exists(), resumed.stdout[-2000:]


def test_imsep_on_the_fly_matches_precomputed(imsep_run, digits_csv, tmp_path):
    # the shared run's --semantic-source auto found train.emb.npy for every row: it is the precomputed side
    assert "0 batches are embedded on the fly" in (imsep_run / "out.log").read_text()
    train([*imsep_argv(digits_csv), "--epochs", "1", "--semantic-source", "on-the-fly",
           "--semantic-model", "all-MiniLM-L6-v2"], tmp_path, "fly")
    pre = logged(imsep_run / "out.log", "Imsep_loss")
    fly = logged(tmp_path / "fly" / "out.log", "Imsep_loss")
    assert len(pre) == 3 and np.allclose(pre, fly, atol=2e-4)


def test_accum_freq_sees_the_whole_batch(embedded_csv, imsep_run, tmp_path):
    """Steps of batch 16 (the shared run) and steps of 2 x 8 with --accum-freq 2 compute the same losses."""
    common = ["--model", "AlignCLIP-Tiny", "--loss", "imsep", "--train-data", str(embedded_csv), "--epochs", "1"]
    train([*common, *base(8), "--accum-freq", "2"], tmp_path, "accum")
    for term in ("Contrastive_loss", "Imsep_loss"):
        whole = logged(imsep_run / "out.log", term)
        acc = logged(tmp_path / "accum" / "out.log", term)
        assert len(whole) == 3 and len(acc) == 3, (term, whole, acc)
        assert abs(whole[0] - acc[0]) < 1e-5, (term, whole, acc)              # same batch, same weights
        assert np.allclose(whole, acc, atol=1e-3), (term, whole, acc)         # same gradients -> same path


def test_clip_loss_identical_with_and_without_plugin(digits_csv, tmp_path):
    """Both runs train the same small upstream-class CLIP: DualCLIP-Tiny saved as OpenCLIP's hub folder, which
    loads without the plugin as --model local-dir:DIR (upstream's smallest ViT-S-32 took minutes on 2 cores)."""
    import open_clip
    from open_clip.push_to_hf_hub import save_for_hf

    torch.manual_seed(0)
    name = "DualCLIP-Tiny"
    save_for_hf(open_clip.create_model(name), open_clip.get_tokenizer(name), open_clip.get_model_config(name),
                tmp_path / "model")
    argv = ["--model", f"local-dir:{tmp_path / 'model'}", "--train-data", str(digits_csv), *BASE, "--epochs", "1"]
    train([*argv, "--loss", "clip"], tmp_path, "plugin")
    train(argv, tmp_path, "upstream", disable=True)
    with_plugin = logged(tmp_path / "plugin" / "out.log", "Contrastive_loss")
    upstream = logged(tmp_path / "upstream" / "out.log", "Contrastive_loss")
    assert len(with_plugin) == 3 and with_plugin == upstream


def test_unknown_loss_lists_valid_names(capsys):
    """Upstream's parser with the plugin's --loss (in this process: every run here parses it in a fresh one)."""
    import open_clip_train.params as params

    with pytest.raises(SystemExit) as exit_:
        params.parse_args(["--loss", "nope", "--train-data", "x.csv"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "invalid choice: 'nope'" in err and "imsep" in err and "clip" in err


def test_missing_embeddings_fail_before_the_first_step(digits_csv, tmp_path):
    out = train(["--model", "AlignCLIP-Tiny", "--loss", "imsep", "--train-data", str(digits_csv), *BASE,
                 "--epochs", "1", "--semantic-source", "precomputed"], tmp_path, "missing", check=False)
    assert out.returncode != 0
    assert "semantic caption embeddings" in out.stderr and "openclip-align embed" in out.stderr
    assert "Train Epoch" not in out.stdout + out.stderr


def test_non_finite_loss_stops_with_a_clear_error_and_no_checkpoint(embedded_csv, tmp_path):
    """A diverging run (absurd lr) must stop by name, not write a checkpoint of NaN weights."""
    out = train(["--model", "AlignCLIP-Tiny", "--loss", "imsep", "--train-data", str(embedded_csv), *base(16, lr=1e8),
                 "--epochs", "1"], tmp_path, "nan", check=False)
    assert out.returncode != 0
    assert "FloatingPointError: --loss imsep became non-finite" in out.stderr
    assert not list((tmp_path / "nan" / "checkpoints").glob("*.pt"))


def test_imsep_on_webdataset_shards_with_precomputed_embeddings(embedded_csv, tmp_path):
    """The shard path: KEY.emb.npy members reach the loss (and a shard with neither those members nor a column is refused at its first sample, by name)."""
    import pandas as pd
    import webdataset as wds

    rows = pd.read_csv(embedded_csv, sep="\t")
    vectors = np.load(embedded_csv.with_suffix(".emb.npy"))
    sizes = {}
    for shard, part in enumerate((range(0, 24), range(24, 48))):
        name = f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(tmp_path / name)) as sink:
            for i in part:
                sink.write({"__key__": f"{i:09d}", "png": Path(rows.filepath[i]).read_bytes(),
                            "txt": rows.title[i], "json": {"index": i}, "emb.npy": vectors[i]})
        sizes[name] = len(part)
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    argv = ["--model", "AlignCLIP-Tiny", "--loss", "imsep", "--train-data", str(tmp_path / "shard-{000000..000001}.tar"),
            *base(16, dataset_type="webdataset"), "--train-num-samples", "32", "--epochs", "1",
            "--semantic-source", "precomputed"]
    train(argv, tmp_path / "logs", "wds")
    assert len(logged(tmp_path / "logs" / "wds" / "out.log", "Imsep_loss")) == 2

    with wds.TarWriter(str(tmp_path / "bare-000000.tar")) as sink:
        sink.write({"__key__": "000000000", "png": Path(rows.filepath[0]).read_bytes(), "txt": rows.title[0]})
    argv[argv.index("--train-data") + 1] = str(tmp_path / "bare-000000.tar")
    out = train(argv, tmp_path / "logs", "bare", check=False)
    assert out.returncode != 0, out.stderr[-1500:]
    assert "bare-000000.tar: no embedding column" in out.stderr and "openclip-align embed" in out.stderr
