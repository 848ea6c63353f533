"""Hand-made benchmark results.json contents (a track's quality and speed tables), for the report and
publishing tests."""


def stat(mean, std=0.01):
    return {"mean": mean, "std": std, "values": [mean]}


def track(gap, r1, rank=20.0, ratio=1.0):
    quality = {"CLIP": {"centroid_gap": stat(gap), "image_to_text_R@1": stat(r1), "effective_rank_image": stat(rank),
                        "mean_norm_image": stat(9.0), "zeroshot_digits_top1": stat(0.5)}}
    speed = {"CLIP": {"samples_per_second": 100.0, "ratio_to_upstream": 1.0, "peak_rss_mb": 1000.0,
                      "peak_cuda_mb": None, "wall_seconds_per_run": 60.0},
             "AlignCLIP": {"samples_per_second": 100.0 * ratio, "ratio_to_upstream": ratio, "peak_rss_mb": 1000.0,
                           "peak_cuda_mb": None, "wall_seconds_per_run": 60.0}}
    return {"title": "T", "plan": {"seeds": [0], "budget": {"epochs": 2, "batch_size": 64, "lr": 1e-3}},
            "quality": quality, "speed": speed, "train_seconds": 120.0, "eval_seconds": 30.0, "skipped": {}}


def results(**tracks):
    return {"created": "2026-11-24 12:00:00", "command": "openclip-align benchmark --data d",
            "machine": {"device": "cpu", "open_clip": "3.3.0"}, "data": {"train_pairs": 10, "encoder": "e"},
            "tracks": tracks, "total_seconds": 600.0, "metric_seconds_100k_pairs_768d": 1.0,
            "variant": "cpu", "compared_with": None, "flags": []}
