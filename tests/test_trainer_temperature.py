"""`--fixed-temperature T` through `python -m open_clip_train.main`: logit_scale = log(1/T), never learned."""
import math
import re

import torch

from _trainer_launch import BASE, train


def test_fixed_temperature_keeps_the_logit_scale_at_log_one_over_t_through_training(digits_csv, tmp_path):
    temperature = 0.05
    argv = ["--model", "DualCLIP-Tiny", "--train-data", str(digits_csv), *BASE, "--epochs", "2",
            "--save-frequency", "1", "--fixed-temperature", str(temperature)]
    train(argv, tmp_path, "fixed")
    run = tmp_path / "fixed"
    expected = math.log(1 / temperature)                                  # 2.9957...
    for epoch in (1, 2):
        state = torch.load(run / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu", weights_only=False)
        scale = state["state_dict"].get("logit_scale", state["state_dict"].get("module.logit_scale"))
        assert scale.item() == torch.tensor(expected, dtype=torch.float32).item()
    logged = [float(v) for v in re.findall(r"Logit Scale: ([0-9.]+)", (run / "out.log").read_text())]
    assert len(logged) == 6 and all(v == 20.0 for v in logged)           # every step (3 per epoch) at 1/T = 20
    # and the other weights did train
    first = torch.load(run / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)["state_dict"]
    second = torch.load(run / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(not torch.equal(first[k], second[k]) for k in first if k.endswith("weight"))


def test_a_temperature_outside_upstreams_clamp_is_refused(digits_csv, tmp_path):
    out = train(["--model", "DualCLIP-Tiny", "--train-data", str(digits_csv), *BASE, "--epochs", "1",
                 "--fixed-temperature", "0.001"], tmp_path, "bad", check=False)
    assert out.returncode != 0 and "--fixed-temperature 0.001: must lie in [0.01, 1.0]" in out.stderr
