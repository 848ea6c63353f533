"""A training loader that cannot deliver batches stops the run with the reason (issue 29): file descriptors
exhausted (the limit and `ulimit -n` named), a pass over a worker's shards that makes no batch (upstream
would repeat it forever), an epoch that got no batch (upstream would exit 0 having trained nothing). And
imsep at a large batch with two workers trains under a low descriptor limit."""
import errno
import io
import itertools
import json
import logging
import resource
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import open_clip_train.data as oc_data
from _trainer_launch import error_lines, train
from openclip_align.integration import loader_health, trainer_adapter
from openclip_align.integration.loader_health import LoaderFailure
from openclip_align.integration.trainer_errors import is_user_facing, one_line


def _shards(folder: Path, parts, width=16):
    """Tiny shards (4x4 PNGs, captions "pair i", KEY.json index, KEY.emb.npy) and their sizes.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = {}
    for shard, part in enumerate(parts):
        name = f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in part:
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(buffer, format="PNG")
                vector = rng.normal(size=width).astype(np.float32)
                sink.write({"__key__": f"{i:09d}", "png": buffer.getvalue(), "txt": f"pair {i}",
                            "json": {"index": i}, "emb.npy": vector / np.linalg.norm(vector)})
        sizes[name] = len(part)
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"shard-{{000000..{len(parts) - 1:06d}}}.tar")


def _clip_loader(pattern, batch_size, workers):
    """Upstream's training pipeline for --loss clip, built under the plugin's read-error handler."""
    args = SimpleNamespace(train_data=pattern, batch_size=batch_size, workers=workers, world_size=1, seed=0,
                           train_num_samples=None, dataset_resampled=False, train_data_upsampling_factors=None)
    with trainer_adapter.stopping_on_fatal_read_errors(oc_data):
        train = oc_data.get_wds_dataset(args, lambda image: torch.zeros(1), is_train=True,
                                        tokenizer=lambda text: [torch.zeros(1, dtype=torch.long)])
    return train.dataloader


def _limit_words():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return f"a process may open {soft} files (`ulimit -n` is {soft})"


# --- descriptor exhaustion ---------------------------------------------------------------------------
def test_handler_stops_on_descriptor_exhaustion_and_leaves_other_errors_to_upstream():
    skipped = []
    handler = loader_health.StopOnFatal(lambda exc: skipped.append(exc) or True)
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory")
    assert handler(missing) is True and skipped == [missing]             # one bad shard: upstream skips it
    exhausted = OSError(errno.EMFILE, "Too many open files")
    exhausted.args = exhausted.args + ("pipe:aws s3 cp s3://b/00041.tar -",)     # as webdataset's url_opener adds it
    with pytest.raises(LoaderFailure) as caught:
        handler(exhausted)
    assert "reading pipe:aws s3 cp s3://b/00041.tar -: out of file descriptors" in str(caught.value)
    assert _limit_words() in str(caught.value) and "\n" not in str(caught.value)
    assert is_user_facing(caught.value) and skipped == [missing]


def test_pipeline_stops_on_descriptor_exhaustion_at_the_shard(tmp_path, monkeypatch):
    """Upstream's own pipeline: a shard open failing with EMFILE ends the epoch by name (upstream: logged,
    skipped, and the pass repeated forever)."""
    pattern = _shards(tmp_path, [range(0, 8)])
    loader = _clip_loader(pattern, batch_size=4, workers=0)

    def exhausted(url, *args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files", url)

    monkeypatch.setattr(sys.modules["webdataset.gopen"], "gopen", exhausted)      # what url_opener calls
    with pytest.raises(LoaderFailure, match=r"^reading \S*shard-000000.tar: out of file descriptors") as caught:
        next(iter(loader))
    assert _limit_words() in str(caught.value)


def test_worker_refuses_a_batch_it_cannot_hand_on(monkeypatch):
    """A batch of many tensors under a low limit: the worker says so (torch's feeder thread would print the
    error, drop the batch and leave the main process waiting for it)."""
    batches = [[torch.zeros(1) for _ in range(40)]]
    guard = loader_health.FullPassGuard(lambda data: iter(list(data)), batch_size=40)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return guard(iter(batches))

    monkeypatch.setattr(resource, "getrlimit", lambda which: (64, 64))   # inherited by the forked worker
    loader = torch.utils.data.DataLoader(Stream(), batch_size=None, num_workers=1)
    with pytest.raises(LoaderFailure) as caught:
        next(iter(loader))
    message = one_line(caught.value)
    assert "cannot hand on a batch of 40 tensors" in message and "`ulimit -n` is 64" in message
    assert "\n" not in message


def test_counting_loader_names_descriptor_exhaustion_in_the_main_process():
    class Receiving:
        num_batches = 2

        def __iter__(self):
            yield "first"
            raise RuntimeError("received 0 items of ancdata")                # torch, when a fd cannot pass

    counting = loader_health.CountingLoader(Receiving())
    with pytest.raises(LoaderFailure, match=r"the training data loader: out of file descriptors"):
        list(counting)
    assert counting.batches == 1 and counting.num_batches == 2

    class Broken:
        def __iter__(self):
            raise ValueError("a decoding bug")
            yield

    with pytest.raises(ValueError, match="a decoding bug"):                 # not ours to rename
        list(loader_health.CountingLoader(Broken()))


# --- no batch ------------------------------------------------------------------------------------------
def test_a_worker_pass_with_fewer_samples_than_a_batch_stops(tmp_path):
    """48 pairs in two shards pass the "one batch of 16" check, but each of two workers sees 12 a pass:
    upstream's with_epoch would start the pass again forever."""
    pattern = _shards(tmp_path, [range(0, 12), range(12, 24)])
    with pytest.raises(LoaderFailure) as caught:
        next(iter(_clip_loader(pattern, batch_size=16, workers=2)))
    assert is_user_facing(caught.value)
    assert ("worker 0 of 2: a whole pass over its shards gave 12 samples, fewer than one batch of --batch-size 16"
            in one_line(caught.value)) or "worker 1 of 2" in one_line(caught.value)


def test_the_pass_guard_lets_passes_with_batches_and_unfinished_passes_be():
    from webdataset.filters import batched

    guard = loader_health.FullPassGuard(batched(2, partial=False), batch_size=2)
    assert [len(b[0]) for b in guard(iter([(torch.zeros(1), i) for i in range(5)]))] == [2, 2]   # remainder dropped
    endless = guard((torch.zeros(1), i) for i in itertools.count())         # a resampled stream: no pass end
    assert len(next(endless)[0]) == 2
    endless.close()                                                          # with_epoch's islice stops here
    with pytest.raises(LoaderFailure, match="gave 1 samples, fewer than one batch of --batch-size 2"):
        list(guard(iter([(torch.zeros(1), 0)])))


def test_a_worker_whose_shards_all_fail_stops(tmp_path):
    for name in ("shard-000000.tar", "shard-000001.tar"):
        (tmp_path / name).write_bytes(b"not a tar file" * 100)
    pattern = str(tmp_path / "shard-{000000..000001}.tar")
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 20, "shard-000001.tar": 20}))
    with pytest.raises(LoaderFailure, match=r"the training loader: no sample of its shards could be read"):
        next(iter(_clip_loader(pattern, batch_size=8, workers=0)))


def test_an_epoch_without_a_batch_stops_and_a_short_one_warns(caplog):
    empty = loader_health.CountingLoader(SimpleNamespace(num_batches=3, __iter__=None))
    with pytest.raises(LoaderFailure) as caught:
        loader_health.check_trained(empty, epoch=4)
    message = str(caught.value)
    assert message.startswith("epoch 4: the training data loader gave no batch (it should give 3)")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert f"`ulimit -n`, now {soft}" in message and "no checkpoint is written" in message
    short = loader_health.CountingLoader(SimpleNamespace(num_batches=3))
    short.batches = 2
    with caplog.at_level(logging.WARNING):
        loader_health.check_trained(short, epoch=0)
    assert "gave 2 of its 3 batches" in caplog.text
    full = loader_health.CountingLoader(SimpleNamespace(num_batches=3))
    full.batches = 3
    loader_health.check_trained(full, epoch=0)


# --- end to end ----------------------------------------------------------------------------------------
def _train(argv, logs: Path, name: str, nofile=None):
    return train(["--model", "AlignCLIP-Tiny", "--precision", "fp32", "--device", "cpu", "--warmup", "1", "--seed",
                  "0", "--log-every-n-steps", "1", "--epochs", "1", "--lr", "1e-4", "--dataset-type", "webdataset",
                  *argv], logs, name, check=False, timeout=300, nofile=nofile)


def test_imsep_at_a_large_batch_with_two_workers_trains_under_a_low_descriptor_limit(tmp_path):
    """Batch 128 under a limit of 128 descriptors: one tensor per sample crossing from the workers (before
    the fix) cannot pass; one per extra can."""
    pattern = _shards(tmp_path / "shards", [range(0, 128), range(128, 256)])
    out = _train(["--loss", "imsep", "--semantic-source", "precomputed", "--train-data", pattern, "--batch-size",
                  "128", "--workers", "2"], tmp_path / "logs", "imsep", nofile=128)
    assert out.returncode == 0, out.stderr[-3000:]
    log = (tmp_path / "logs" / "imsep" / "out.log").read_text()
    assert log.count("Imsep_loss") == 2 and "Too many open files" not in log
    assert (tmp_path / "logs" / "imsep" / "checkpoints" / "epoch_1.pt").exists()


def test_a_run_whose_loader_fails_exits_non_zero_with_the_reason(tmp_path):
    """Shards that cannot be read (not tar files; or, remote, a `pipe:` command that fails): upstream logs
    each failure and starts the pass again forever; here the run ends non-zero naming why."""
    for name in ("shard-000000.tar", "shard-000001.tar"):
        (tmp_path / name).write_bytes(b"not a tar file" * 100)
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 24, "shard-000001.tar": 24}))
    pattern = str(tmp_path / "shard-{000000..000001}.tar")
    out = _train(["--train-data", pattern, "--batch-size", "8", "--workers", "2"], tmp_path / "logs", "clip")
    assert out.returncode != 0
    errors = error_lines(out)
    assert len(errors) == 1 and "no sample of its shards could be read" in errors[0], out.stderr[-3000:]
    assert "Train Epoch" not in out.stderr and not list((tmp_path / "logs").rglob("*.pt"))


def _reader_of(good):
    """A stand-in for upstream's shard reader: two samples from a shard named in ``good``, none from any other
    (its open or read failed and the handler skipped it)."""
    def read(shards, handler):
        for shard in shards:
            if shard["url"] in good:
                yield from ({"url": shard["url"], "n": n} for n in range(2))
    return read


def test_a_resampled_pool_whose_shards_all_fail_stops_and_one_good_shard_keeps_it_going():
    def endless(urls):
        return ({"url": url} for url in itertools.cycle(urls))

    three_bad = loader_health.ReadingShards(_reader_of(set()), handler=None)
    # 3 distinct shards: the bound is the floor, 64 draws without a sample; the 65th draw raises
    with pytest.raises(LoaderFailure, match=r"the training loader: the last 64 shards it drew \(3 different ones\) "
                                            r"gave no sample"):
        next(three_bad(endless(["a", "b", "c"])))
    # 100 distinct shards, all failing: twice the distinct ones, 200 draws, then it raises
    with pytest.raises(LoaderFailure, match=r"the last 200 shards it drew \(100 different ones\)"):
        next(three_bad(endless([f"s{i}" for i in range(100)])))
    # one good shard after every 40 failing ones: 41 draws at most between samples, never stops
    mixed = loader_health.ReadingShards(_reader_of({"good"}), handler=None)
    stream = mixed(endless([f"bad{i}" for i in range(40)] + ["good"]))
    assert len(list(itertools.islice(stream, 1000))) == 1000
    # a fixed list drawn once (no --dataset-resampled) ends its pass: the pass guard speaks there, not this
    assert list(three_bad({"url": f"s{i}"} for i in range(500))) == []


def test_a_resampled_run_whose_shards_all_fail_exits_non_zero_with_the_reason(tmp_path):
    """--dataset-resampled draws shards with replacement for ever: upstream would log each failure and keep
    drawing (a hang); here the run ends non-zero naming why."""
    for name in ("shard-000000.tar", "shard-000001.tar"):
        (tmp_path / name).write_bytes(b"not a tar file" * 100)
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 24, "shard-000001.tar": 24}))
    pattern = str(tmp_path / "shard-{000000..000001}.tar")
    out = _train(["--train-data", pattern, "--batch-size", "8", "--workers", "1", "--dataset-resampled",
                  "--train-num-samples", "48"], tmp_path / "logs", "resampled")
    assert out.returncode != 0
    errors = error_lines(out)
    assert len(errors) == 1 and "gave no sample: every one failed to open or read" in errors[0], out.stderr[-3000:]
    assert "Train Epoch" not in out.stderr and not list((tmp_path / "logs").rglob("*.pt"))
