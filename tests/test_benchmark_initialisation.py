"""The benchmark's table at initialisation, on a tiny digits corpus: each seed's numbers match the formulas
computed by hand on that seed's own random model, the summary matches NumPy's mean and sample std, and a seed
always draws the same model."""
import numpy as np
import pytest

from conftest import write_digits_corpus
from openclip_align.experiments.initialisation import INIT_KEYS, initialisation_lines, measure_initialisation

MODELS = ["DualCLIP-Tiny", "SharedCLIP-Tiny"]
SEEDS = (0, 1, 2, 3, 4)
LIMIT = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_digits_corpus(tmp_path_factory.mktemp("init_corpus"), n_train=4, n_heldout=20)


@pytest.fixture(scope="module")
def init(corpus):
    return measure_initialisation(corpus, MODELS, SEEDS, limit=LIMIT)


def by_hand(corpus, name, seed):
    """Gap, alignment score and cones of one seed's model from their definitions (dense, float64)."""
    import open_clip
    import torch

    from openclip_align.evaluation import embed_pairs

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    image, text = embed_pairs(model.eval(), preprocess, open_clip.get_tokenizer(name), str(corpus / "heldout.csv"),
                              limit=LIMIT, progress=False)
    x, y = image.double().numpy(), text.double().numpy()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    n = len(x)
    off = ~np.eye(n, dtype=bool)
    return {"centroid_gap": np.linalg.norm(x.mean(0) - y.mean(0)), "alignment_score": np.sum(x * y) / n,
            "cone_image": (x @ x.T)[off].mean(), "cone_text": (y @ y.T)[off].mean()}


def test_every_model_has_five_seeds_summarised_as_mean_and_sample_std(init):
    assert list(init["models"]) == MODELS and init["seeds"] == list(SEEDS) and init["seconds"] >= 0
    for row in init["models"].values():
        assert row["pairs"] == LIMIT
        for key in INIT_KEYS:
            values = np.array(row[key]["values"])
            assert len(values) == 5
            assert row[key]["mean"] == pytest.approx(values.mean(), abs=1e-12)
            assert row[key]["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        for key in ("cone_image", "cone_text", "alignment_score"):
            assert all(-1.0 <= v <= 1.0 for v in row[key]["values"])
        assert all(0.0 <= v <= 2.0 for v in row["centroid_gap"]["values"])
        for key in ("effective_rank_image", "effective_rank_text"):   # centred: at most n - 1 directions
            assert all(1.0 <= v <= LIMIT - 1 + 1e-6 for v in row[key]["values"])
        assert len(set(row["centroid_gap"]["values"])) == 5        # each seed draws other weights


def test_a_seed_s_numbers_are_its_own_model_s_by_the_formulas(corpus, init):
    for name, seed in (("DualCLIP-Tiny", 3), ("SharedCLIP-Tiny", 1)):
        expected = by_hand(corpus, name, seed)
        for key, value in expected.items():
            assert init["models"][name][key]["values"][seed] == pytest.approx(value, abs=1e-5), (name, key)


def test_the_same_seed_gives_the_same_numbers_in_any_order(corpus, init):
    again = measure_initialisation(corpus, ["SharedCLIP-Tiny"], (4, 2), limit=LIMIT)
    for key in INIT_KEYS:
        first = init["models"]["SharedCLIP-Tiny"][key]["values"]
        assert again["models"]["SharedCLIP-Tiny"][key]["values"] == pytest.approx([first[4], first[2]], abs=1e-6)


def test_the_table_has_a_row_per_model_with_the_measured_means(init):
    lines = initialisation_lines(init)
    dual = init["models"]["DualCLIP-Tiny"]
    row = next(line for line in lines if line.startswith("| DualCLIP-Tiny |"))
    assert row.startswith(f"| DualCLIP-Tiny | {LIMIT} | {dual['centroid_gap']['mean']:.3f} ± ")
    assert any(line.startswith("| SharedCLIP-Tiny |") for line in lines)
    assert initialisation_lines(None) == [] and initialisation_lines({}) == []
