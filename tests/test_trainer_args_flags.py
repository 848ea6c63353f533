"""The plugin's trainer flags, checked against a table written out by hand.

The table was taken from the parser as it stood before the loss options were declared once (issue 30): every
flag's spelling, dest, default, type, choices, action, metavar and help text. Users' commands and the options
recorded in checkpoints depend on them, so a change to any of them has to show up here.
"""
import pytest

from openclip_align.integration.trainer_args import build_plugin_parser, loss_option_names

STORE, TRUE, BOOL = "_StoreAction", "_StoreTrueAction", "BooleanOptionalAction"

# group -> [(option strings, dest, default, type, choices, action, metavar, help)]
FLAGS = {
    "openclip-align": [
        (["--loss"], "loss", "clip", None, ["clip", "cyclip", "imsep", "onlineclr", "refine", "sogclr", "vicreg"],
         STORE, "NAME", "training objective; one of: clip, cyclip, imsep, onlineclr, refine, sogclr, vicreg "
         "(default: clip, upstream OpenCLIP's loss, unchanged)"),
        (["--semantic-source"], "semantic_source", "auto", None, ("auto", "precomputed", "on-the-fly"), STORE, None,
         "where a loss that needs caption embeddings gets them: precomputed (csv side file / KEY.emb.npy shard "
         "member), on-the-fly (embed each batch's captions), or auto (precomputed when present, else on the fly)"),
        (["--semantic-model"], "semantic_model", "all-mpnet-base-v2", None, None, STORE, None,
         "sentence-transformers model for on-the-fly caption embeddings (default: the AlignCLIP authors' "
         "all-mpnet-base-v2; all-MiniLM-L6-v2 is the fast choice)"),
        (["--semantic-embeddings"], "semantic_embeddings", None, None, None, STORE, None,
         "precomputed caption embeddings: for a csv, the row-aligned .npy file (default: <csv stem>.emb.npy); for "
         "webdataset shards, the folder of their embedding columns (NAME.emb.npy + NAME.emb.json, as `openclip-align "
         "embed --out DIR` writes them; default: beside the shards), or A::B, one folder per '::' source of "
         "--train-data, in the same order"),   # was "csv only: ...", though shards take it too (issue 30)
        (["--csv-index-key"], "csv_index_key", "index", None, None, STORE, None,
         "csv column with a stable per-pair index (default: the row number if absent)"),
        (["--drop-empty-captions"], "drop_empty_captions", False, None, None, TRUE, None,
         "leave out training pairs whose caption is empty or missing (counted in the log) instead of refusing "
         "the data; csv rows and shard samples alike"),
        (["--gap-metrics", "--no-gap-metrics"], "gap_metrics", True, None, None, BOOL, None,
         "log modality-gap metrics next to retrieval metrics during evaluation"),
        (["--gap-max-pairs"], "gap_max_pairs", 5000, int, None, STORE, None,
         "subsample size for the O(N^2) modality-gap metrics"),
        (["--log-root"], "log_root", None, None, None, STORE, "DIR",
         "the same as upstream's --logs DIR, in a spelling torchrun does not read as an abbreviation of its own "
         "--logs-specs (see docs/training.md)"),
        (["--fixed-temperature"], "fixed_temperature", None, float, None, STORE, "T",
         "train at temperature T: logit_scale is set to log(1/T) and not learned (T in [0.01, 1.0]; default: "
         "learned, as upstream)"),
    ],
    "--loss cyclip": [
        (["--cyclip-inmodal-weight"], "cyclip_inmodal_weight", 0.25, float, None, STORE, None,
         "CyCLIP: weight of the in-modal cyclic term (default: 0.25)"),
        (["--cyclip-crossmodal-weight"], "cyclip_crossmodal_weight", 0.25, float, None, STORE, None,
         "CyCLIP: weight of the cross-modal cyclic term (default: 0.25)"),
    ],
    "--loss imsep": [
        (["--imsep-weight"], "imsep_weight", 0.25, float, None, STORE, None,
         "weight of each IMSep term relative to OpenCLIP's CLIP loss (the mean of its two directions); 0.25 with "
         "the text term = the authors' script (CE(tC) + CE(tC^T) + 0.5 (IMSep_img + IMSep_txt)); 0.5 with "
         "--no-imsep-text = this project's pre-2026-11-24 default (default: 0.25)"),
        (["--imsep-text", "--no-imsep-text"], "imsep_text", True, None, None, BOOL, None,
         "the text-side term (caption-caption logits rescaled the same way), as the authors' script runs it; "
         "--no-imsep-text keeps the image side only, as the paper's text describes the method (default: on)"),
    ],
    "--loss onlineclr": [
        (["--onlineclr-tau-n"], "onlineclr_tau_n", 0.01, float, None, STORE, None,
         "OnlineCLR: temperature of the negatives (default: 0.01)"),
        (["--onlineclr-tau-p"], "onlineclr_tau_p", 0.1, float, None, STORE, None,
         "OnlineCLR: temperature of the positives (default: 0.1)"),
        (["--onlineclr-gamma"], "onlineclr_gamma", 0.8, float, None, STORE, None,
         "OnlineCLR: moving-average rate of the normalisers (default: 0.8)"),
    ],
    "--loss refine": [
        (["--hycd-alpha"], "hycd_alpha", 0.5, float, None, STORE, None,
         "HyCD: weight of the identity in the target distribution (default: 0.5)"),
        (["--rafa-weight"], "rafa_weight", 1.0, float, None, STORE, None, "weight of the RaFA term (default: 1.0)"),
        (["--rafa-scale"], "rafa_scale", 1.0, float, None, STORE, None,
         "RaFA: standard deviation of the Gaussian reference (default: 1.0)"),
        (["--hycd-logit-scale"], "hycd_logit_scale", None, float, None, STORE, "S",
         "HyCD on S x cosine similarities (student and teacher) instead of the authors' unscaled raw-feature dot "
         "products, i.e. at temperature 1/S (default: the authors')"),
        (["--rafa-seed"], "rafa_seed", None, int, None, STORE, None,
         "RaFA: seed of the reference generator, the same on every rank (default: --seed)"),
    ],
    "--loss sogclr": [
        (["--sogclr-gamma"], "sogclr_gamma", 0.8, float, None, STORE, None,
         "SogCLR: moving-average rate of the per-sample normalisers (default: 0.8)"),
        (["--sogclr-tau"], "sogclr_tau", 0.01, float, None, STORE, None, "SogCLR: temperature (default: 0.01)"),
    ],
    "--loss vicreg": [
        (["--vicreg-sim-weight"], "vicreg_sim_weight", 25.0, float, None, STORE, None,
         "VICReg: weight of the invariance (MSE) term (default: 25.0)"),
        (["--vicreg-var-weight"], "vicreg_var_weight", 25.0, float, None, STORE, None,
         "VICReg: weight of the variance term (default: 25.0)"),
        (["--vicreg-cov-weight"], "vicreg_cov_weight", 1.0, float, None, STORE, None,
         "VICReg: weight of the covariance term (default: 1.0)"),
    ],
}


def _row(action):
    return (action.option_strings, action.dest, action.default, action.type, action.choices,
            type(action).__name__, action.metavar, action.help)


def _groups():
    parser = build_plugin_parser()
    return {g.title: g._group_actions for g in parser._action_groups if g._group_actions}


def test_the_plugin_parser_has_exactly_the_groups_of_the_table_in_order():
    assert list(_groups()) == list(FLAGS)


@pytest.mark.parametrize("group", list(FLAGS))
def test_every_flag_keeps_its_name_default_type_choices_and_help(group):
    got = [_row(a) for a in _groups()[group]]
    assert len(got) == len(FLAGS[group])
    for row, expected in zip(got, FLAGS[group]):
        assert row == expected, row[0]
        assert type(row[2]) is type(expected[2]), (row[0], row[2])       # 25.0 stays a float, 5000 an int


@pytest.mark.parametrize("group", [g for g in FLAGS if g.startswith("--loss ")])
def test_the_checkpoint_records_each_loss_option_by_its_dest(group):
    name = group.split()[1]
    assert loss_option_names(name) == [row[1] for row in FLAGS[group]]


def test_clip_records_no_option():
    assert loss_option_names("clip") == []


def test_the_defaults_parse_from_an_empty_command_line():
    args = build_plugin_parser().parse_args([])
    for rows in FLAGS.values():
        for row in rows:
            assert getattr(args, row[1]) == row[2], row[0]


def test_a_loss_flag_reads_its_type_from_the_command_line():
    args = build_plugin_parser().parse_args(["--vicreg-cov-weight", "3", "--rafa-seed", "7", "--no-imsep-text",
                                             "--hycd-logit-scale", "15"])
    assert (args.vicreg_cov_weight, args.rafa_seed, args.imsep_text, args.hycd_logit_scale) == (3.0, 7, False, 15.0)
    assert type(args.vicreg_cov_weight) is float and type(args.rafa_seed) is int
    with pytest.raises(SystemExit):
        build_plugin_parser().parse_args(["--rafa-seed", "1.5"])


def test_each_loss_group_says_what_the_loss_is():
    """The one-line description each loss registers is what --help shows above its flags."""
    expected = {"imsep": "AlignCLIP: CLIP loss + --imsep-weight", "refine": "CLIP-Refine post-pre-training",
                "sogclr": "SogCLR: contrastive loss", "cyclip": "CyCLIP: CLIP loss",
                "vicreg": "VICReg across modalities", "onlineclr": "OnlineCLR: negatives at"}
    groups = {group.title: group.description for group in build_plugin_parser()._action_groups}
    for loss, start in expected.items():
        assert (groups[f"--loss {loss}"] or "").startswith(start), loss
