"""FER+ (issue 10): the vote loaders and their joins, the label modes, training and evaluation with 8 classes.
Training runs atto at 32 px on one CPU thread, on synthetic faces with synthetic votes."""
import io
import os
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import emonext
import eval as evaluate
import predict
import synthetic
import train
from conftest import FER2013_NPZ
from emonext import EmoNeXt, config_dict

FERPLUS_CSV = os.path.join(os.path.dirname(FER2013_NPZ), "fer2013new.csv")
HEADER = "Usage,Image name," + ",".join(data.FERPLUS_COLUMNS)
USAGES = ["Training"] * 4 + ["PublicTest"] * 2 + ["PrivateTest"] * 2
# one row per face of the fer2013.csv below; row 2 is a face FER+ dropped (no image name)
VOTES = np.array([[6, 0, 1, 1, 0, 0, 0, 0, 2, 0],
                  [0, 8, 0, 0, 0, 0, 0, 0, 2, 0],
                  [0, 0, 0, 0, 0, 0, 0, 0, 0, 10],
                  [4, 0, 0, 1, 3, 2, 0, 0, 0, 0],
                  [0, 0, 9, 0, 0, 0, 1, 0, 0, 0],
                  [5, 5, 0, 0, 0, 0, 0, 0, 0, 0],
                  [0, 0, 0, 0, 0, 0, 0, 7, 3, 0],
                  [2, 0, 0, 0, 0, 0, 0, 0, 8, 0]])
DROPPED = 2


def faces(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48), dtype=np.uint8)


def write_pair(tmp_path, votes=VOTES, usages=USAGES, extra_lines=()):
    """A fer2013.csv of random faces and its fer2013.csv-ordered fer2013new.csv; returns (csv, new csv, faces)."""
    x = faces(len(usages))
    rows = [f"{i % 7},{' '.join(map(str, f.ravel().tolist()))},{u}" for i, (f, u) in enumerate(zip(x, usages))]
    fer = tmp_path / "fer2013.csv"
    fer.write_text("\n".join(["emotion,pixels,Usage"] + rows) + "\n")
    new = [f"{u},{'' if i == DROPPED else f'fer{i:07d}.png'},{','.join(map(str, v))}"
           for i, (u, v) in enumerate(zip(usages, votes))]
    ferplus = tmp_path / "fer2013new.csv"
    ferplus.write_text("\n".join([HEADER] + new + list(extra_lines)) + "\n")
    return fer, ferplus, x


def assert_error(fn, where, *args, **kwargs):
    """One ValueError whose message starts with the file (and line) it is about."""
    with pytest.raises(ValueError) as e:
        fn(*args, **kwargs)
    assert str(e.value).startswith(str(where)), str(e.value)
    return str(e.value)

# -----------------------------------------------------------------------------
# loaders and joins


def test_csv_pair_loads_the_exact_votes(tmp_path):
    fer, ferplus, x = write_pair(tmp_path)
    splits = data.load_fer2013(fer, ferplus=ferplus)
    kept = {"train": [0, 1, 3], "val": [4, 5], "test": [6, 7]}  # row 2 (train) was dropped by FER+
    for name, rows in kept.items():
        sx, votes = splits[name]
        assert votes.dtype == torch.int64 and votes.shape == (len(rows), 10)
        assert torch.equal(votes, torch.from_numpy(VOTES[rows]))
        assert torch.equal(sx, torch.from_numpy(x[rows]))  # the pixels stay FER2013's, row for row


def test_npz_joins_by_csv_index(tmp_path):
    fer, ferplus, x = write_pair(tmp_path)
    # npz rows in another order than fer2013.csv (as the real one, sorted by class), one face of unknown row
    train_rows, test_rows = np.array([3, -1, 2, 0, 1]), np.array([7, 6])
    unknown = faces(1, seed=5)[0]
    train_x = np.stack([x[r] if r >= 0 else unknown for r in train_rows])
    npz = tmp_path / "faces.npz"
    np.savez(npz, train_x=train_x, train_y=np.zeros(5, np.int64), train_csv_index=train_rows.astype(np.int32),
             private_test_x=x[test_rows], private_test_y=np.zeros(2, np.int64), private_test_csv_index=test_rows)
    splits, description = data.load_dataset(str(npz), labels="ferplus-majority", ferplus=str(ferplus))
    votes = data.load_fer2013(npz, ferplus=ferplus)
    assert torch.equal(votes["train"][1], torch.from_numpy(VOTES[[3, 0, 1]]))
    assert torch.equal(votes["train"][0], torch.from_numpy(x[[3, 0, 1]]))
    assert torch.equal(votes["test"][1], torch.from_numpy(VOTES[[7, 6]]))
    assert votes["val"][1].shape == (0, 10)
    assert "train 1 + 1" in description and "test 0 + 0" in description  # 1 dropped by FER+, 1 of unknown row
    # majority labels: row 3 has none (4 of 9 remaining votes), row 7's winner is unknown
    assert splits["train"][1].tolist() == [0, 1] and splits["test"][1].tolist() == [7]


def test_load_dataset_label_modes_and_default_vote_file(tmp_path):
    fer, _, x = write_pair(tmp_path)  # fer2013new.csv lies beside fer2013.csv: found without ferplus=
    splits, description = data.load_dataset(str(fer), labels="ferplus-soft")
    train_x, train_y = splits["train"]
    assert train_y.dtype == torch.float32 and train_y.shape == (3, 8)
    assert torch.equal(train_x, torch.from_numpy(x[[0, 1, 3]]))
    assert torch.allclose(train_y.sum(1), torch.ones(3))
    # val and test keep the majority protocol whatever the training labels
    assert splits["val"][1].tolist() == [2] and splits["test"][1].tolist() == [7]
    assert "left out by the label rule: train 0 (soft), val 1 (majority), test 1 (majority)" in description
    assert description.endswith("train 3 / val 1 / test 1")
    assert data.class_names("ferplus-soft") == data.FERPLUS_CLASS_NAMES and len(data.FERPLUS_CLASS_NAMES) == 8
    assert data.class_names("fer2013") == emonext.FER2013_CLASS_NAMES


def test_ferplus_folder_tree(tmp_path):
    x = faces(5, seed=3)
    layout = {"FER2013Train": [0, 1, 2], "FER2013Test": [3, 4]}  # no FER2013Valid: an empty val split
    for folder, rows in layout.items():
        (tmp_path / folder).mkdir()
        lines = []
        for i in rows:
            Image.fromarray(x[i]).save(tmp_path / folder / f"fer{i:07d}.png")
            lines.append(f'fer{i:07d}.png,"(0, 0, 48, 48)",{",".join(map(str, VOTES[i]))}')
        (tmp_path / folder / "label.csv").write_text("\n".join(lines) + "\n")
    splits = data.load_fer2013(tmp_path)
    assert torch.equal(splits["train"][0], torch.from_numpy(x[:3]))
    assert torch.equal(splits["train"][1], torch.from_numpy(VOTES[:3]))
    assert torch.equal(splits["test"][1], torch.from_numpy(VOTES[3:5]))
    assert splits["val"][0].shape == (0, 48, 48) and splits["val"][1].shape == (0, 10)
    splits, _ = data.load_dataset(str(tmp_path), labels="ferplus-majority")
    assert splits["train"][1].tolist() == [0, 1] and splits["test"][1].tolist() == [2]
    assert_error(data.load_dataset, tmp_path, str(tmp_path))  # FER2013 labels asked of FER+ votes

    label_csv = tmp_path / "FER2013Test" / "label.csv"
    good = label_csv.read_text()
    label_csv.write_text(good.replace(",0,0,9,", ",0,0,x,", 1))
    assert "line 2: surprise vote 'x'" in assert_error(data.load_fer2013, label_csv, tmp_path)
    label_csv.write_text(good.replace('"(0, 0, 48, 48)",', "", 1))
    assert "line 1: expected 12 fields" in assert_error(data.load_fer2013, label_csv, tmp_path)
    label_csv.write_text(good + 'fer9999999.png,"(0, 0, 48, 48)",10,0,0,0,0,0,0,0,0,0\n')
    assert_error(data.load_fer2013, tmp_path / "FER2013Test" / "fer9999999.png", tmp_path)  # a missing image
    assert_error(data.load_fer2013, tmp_path, tmp_path, ferplus=FERPLUS_CSV)  # votes given twice


def test_mismatched_files_are_clear_errors(tmp_path):
    fer, ferplus, _ = write_pair(tmp_path)
    good = ferplus.read_text().splitlines()

    def load_with(lines):
        ferplus.write_text("\n".join(lines) + "\n")
        return assert_error(data.load_fer2013, ferplus, fer, ferplus=ferplus)

    assert "7 data rows, but" in load_with(good[:-1]) and str(fer) in load_with(good[:-1])  # one row short
    assert "line 3: happiness vote '8.5'" in load_with([good[0], good[1], good[2].replace(",8,", ",8.5,")] + good[3:])
    assert "line 2: neutral vote '-1'" in load_with([good[0], good[1].replace(",6,", ",-1,")] + good[2:])
    assert "line 1: not FER+'s header" in load_with(["emotion,pixels,Usage"] + good[1:])
    assert "line 4: expected 12 fields" in load_with(good[:3] + [good[3] + ",0"] + good[4:])
    assert "line 2: Usage 'Train'" in load_with([good[0], good[1].replace("Training", "Train")] + good[2:])
    swapped = good[:4] + [good[5], good[4]] + good[6:]  # a train row and a val row swapped
    assert "line 5: a val row, but it is the row of train face 3" in load_with(swapped)
    assert "line 1: not FER+'s header" in load_with([])
    assert_error(data.load_fer2013, tmp_path / "nothing.csv", fer, ferplus=tmp_path / "nothing.csv")
    assert_error(data.load_dataset, "synthetic", "synthetic", labels="ferplus-majority")
    assert_error(data.load_dataset, "labels 'ferplus'", str(fer), labels="ferplus")
    assert_error(data.load_dataset, ferplus, str(fer), ferplus=str(ferplus))  # votes given without FER+ labels


def test_npz_without_or_with_bad_csv_index(tmp_path):
    _, ferplus, x = write_pair(tmp_path)
    npz = tmp_path / "a.npz"
    np.savez(npz, train_x=x[:2], train_y=np.zeros(2, np.int64))
    assert "no csv_index array for its train split" in assert_error(data.load_fer2013, npz, npz, ferplus=ferplus)
    np.savez(npz, train_x=x[:2], train_y=np.zeros(2, np.int64), train_csv_index=np.array([0, 8]))
    assert "beyond the 8 rows" in assert_error(data.load_fer2013, npz, npz, ferplus=ferplus)
    np.savez(npz, train_x=x[:2], train_y=np.zeros(2, np.int64), train_csv_index=np.array([0.0, 1.0]))
    assert_error(data.load_fer2013, npz, npz)

# -----------------------------------------------------------------------------
# label modes


@pytest.mark.parametrize("votes, majority, soft", [
    ([6, 0, 1, 1, 0, 0, 0, 0, 2, 0], 0, [1, 0, 0, 0, 0, 0, 0, 0]),  # single votes dropped, unknown left out
    ([4, 0, 0, 1, 3, 2, 0, 0, 0, 0], None, [4 / 9, 0, 0, 0, 3 / 9, 2 / 9, 0, 0]),  # 4 of 9: no majority
    ([5, 5, 0, 0, 0, 0, 0, 0, 0, 0], None, [0.5, 0.5, 0, 0, 0, 0, 0, 0]),  # a tie between emotions
    ([0, 0, 0, 0, 0, 0, 0, 6, 4, 0], 7, [0, 0, 0, 0, 0, 0, 0, 1]),  # contempt beats unknown
    ([3, 0, 0, 0, 0, 0, 0, 0, 7, 0], None, None),  # unknown wins
    ([0, 0, 0, 0, 0, 0, 0, 0, 0, 10], None, None),  # not a face
    ([4, 2, 0, 0, 0, 0, 0, 0, 4, 0], None, None),  # an emotion tied with unknown is no winner
    ([2, 0, 0, 0, 0, 0, 0, 0, 0, 2], None, None),  # ... nor one tied with not-a-face
    ([4, 0, 0, 3, 0, 0, 0, 0, 3, 0], None, [4 / 7, 0, 0, 3 / 7, 0, 0, 0, 0]),  # beats unknown, no majority
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], None, None),  # every vote single: nothing left
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, None),  # a single vote in all
    ([0, 2, 0, 0, 0, 0, 0, 0, 0, 0], 1, [0, 1, 0, 0, 0, 0, 0, 0]),  # two votes are enough
])
def test_label_modes(votes, majority, soft):
    v = torch.tensor([votes])
    keep, y = data.ferplus_targets(v, "majority")
    assert keep.tolist() == [majority is not None] and y.dtype == torch.int64
    assert y.tolist() == ([] if majority is None else [majority])
    keep, y = data.ferplus_targets(v, "soft")
    assert keep.tolist() == [soft is not None] and y.dtype == torch.float32 and y.shape == (int(keep.sum()), 8)
    if soft is not None:
        assert torch.allclose(y[0], torch.tensor(soft, dtype=torch.float32))


def test_label_modes_on_many_rows_match_the_rules_one_by_one():
    votes = torch.from_numpy(np.random.default_rng(0).multinomial(10, np.full(10, 0.1), 500))
    keep_m, y_m = data.ferplus_targets(votes, "majority")
    keep_s, y_s = data.ferplus_targets(votes, "soft")
    expected_m, expected_s = [], []
    for row in votes.tolist():
        left = [v if v > 1 else 0 for v in row]
        top = max(left)
        if 2 * top > sum(left) and left.index(top) < 8:
            expected_m.append(left.index(top))
        if max(left[:8]) > max(left[8:]):
            expected_s.append([v / sum(left[:8]) for v in left[:8]])
    assert y_m.tolist() == expected_m and int(keep_m.sum()) == len(expected_m)
    assert torch.allclose(y_s, torch.tensor(expected_s)) and int(keep_s.sum()) == len(expected_s)
    assert 0 < len(expected_m) < len(expected_s) < 500  # the rows exercise every branch
    with pytest.raises(ValueError, match="label mode 'probability'"):
        data.ferplus_targets(votes, "probability")


def test_draw_labels_follow_the_distribution():
    dist = torch.tensor([[0.0, 0.75, 0.25, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1.0]]).repeat(2000, 1)
    drawn = data.draw_labels(dist, torch.Generator().manual_seed(0))
    assert drawn.dtype == torch.int64 and set(drawn[1::2].tolist()) == {7}
    share = (drawn[0::2] == 1).double().mean().item()
    assert set(drawn[0::2].tolist()) == {1, 2} and 0.72 < share < 0.78, share
    assert torch.equal(drawn, data.draw_labels(dist, torch.Generator().manual_seed(0)))  # seeded: reproducible

# -----------------------------------------------------------------------------
# training and evaluation with FER+ labels

FER2013_TO_FERPLUS = np.array([4, 5, 6, 1, 3, 2, 0])  # angry, disgust, fear, happy, sad, surprise, neutral


@pytest.fixture(scope="module")
def faces_with_votes(tmp_path_factory):
    """Synthetic faces in the fer2013.npz layout (csv_index included) and a fer2013new.csv of synthetic votes:
    7 for the face's expression and 3 spread at random, so some faces have soft targets and no majority."""
    root = tmp_path_factory.mktemp("ferplus")
    d = synthetic.synthetic_faces(n_train=256, n_val=48, n_test=48, seed=3)
    y = torch.cat([d[name][1] for name in ("train", "val", "test")]).numpy()
    rng = np.random.default_rng(0)
    votes = rng.multinomial(3, np.full(10, 0.1), len(y))
    votes[np.arange(len(y)), FER2013_TO_FERPLUS[y]] += 7
    usage = ["Training"] * 256 + ["PublicTest"] * 48 + ["PrivateTest"] * 48
    (root / "fer2013new.csv").write_text("\n".join([HEADER] + [f"{u},fer{i:07d}.png,{','.join(map(str, v))}"
                                                               for i, (u, v) in enumerate(zip(usage, votes))]))
    arrays, start = {}, 0
    for name, prefix in (("train", "train"), ("val", "public_test"), ("test", "private_test")):
        x, yy = d[name]
        arrays.update({f"{prefix}_x": x.numpy(), f"{prefix}_y": yy.numpy(),
                       f"{prefix}_csv_index": np.arange(start, start + len(yy))})
        start += len(yy)
    np.savez(root / "faces.npz", **arrays)
    return root


def tiny_args(root, labels, max_iters=8, *extra):
    return ["--data", str(root / "faces.npz"), "--labels", labels, "--model", "atto", "--img-size", "32",
            "--batch-size", "32", "--max-iters", str(max_iters), "--eval-interval", str(max_iters), "--warmup", "2",
            "--log-interval", "4", "--out-dir", str(root / f"out-{labels}"), "--threads", "1", *extra]


def smoothed_cross_entropy(logits, target, smoothing):
    """Cross-entropy against a distribution, label smoothing mixed in, written out by hand."""
    target = (1 - smoothing) * target + smoothing / target.shape[1]
    return -(target * F.log_softmax(logits.double(), -1)).sum(1).mean()


def test_soft_targets_train_with_cross_entropy_against_the_distribution(faces_with_votes):
    args = train.parse_args(tiny_args(faces_with_votes, "ferplus-soft", 8, "--label-smoothing", "0.1"))
    with redirect_stdout(io.StringIO()):
        run = train.setup(args, None)
    torch.set_num_threads(1)
    assert run.model.config.num_classes == 8 and run.train_y.dtype == torch.float32
    run.model.train()
    losses = []
    for idx in list(train.epoch_batches(run))[:3]:
        logits, yb, loss, ce, sa, _ = train.train_step(run, idx)
        assert torch.equal(yb, run.train_y[idx]) and yb.shape == (32, 8)
        torch.testing.assert_close(ce.double(), smoothed_cross_entropy(logits.detach(), yb, 0.1), rtol=1e-6, atol=0)
        torch.testing.assert_close(loss, ce + sa)  # --sa-weight 1
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    # the self-attention term sees the features only: the same with hard and with soft targets
    run.model.eval()
    x = emonext.preprocess(run.train_x[:8], 32)
    _, _, (_, sa_soft) = run.model(x, run.train_y[:8], loss_parts=True)
    _, _, (_, sa_hard) = run.model(x, run.train_y[:8].argmax(1), loss_parts=True)
    assert torch.equal(sa_soft, sa_hard)


def test_draw_mode_trains_on_labels_drawn_from_the_votes(faces_with_votes):
    args = train.parse_args(tiny_args(faces_with_votes, "ferplus-draw"))
    with redirect_stdout(io.StringIO()):
        run = train.setup(args, None)
    torch.set_num_threads(1)
    idx = next(train.epoch_batches(run))
    logits, yb, loss, ce, _, _ = train.train_step(run, idx)
    assert yb.dtype == torch.int64 and yb.shape == (32,)
    assert (run.train_y[idx].gather(1, yb[:, None]) > 0).all()  # each drawn class has votes
    torch.testing.assert_close(ce.double(), smoothed_cross_entropy(logits.detach(), F.one_hot(yb, 8).double(), 0.2))
    run.it = 0  # the same iteration draws the same labels (resume sees the same batches)
    assert torch.equal(train.train_step(run, idx)[1], yb)


def test_accuracy_of_soft_targets_is_against_their_most_voted_class():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert train.accuracy(logits, torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.6, 0.3]])) == 0.5
    assert train.accuracy(logits, torch.tensor([1, 0])) == 1.0


def test_ferplus_run_end_to_end_and_eval_shows_8_classes(faces_with_votes, capsys, tmp_path):
    out = faces_with_votes / "out-ferplus-soft"
    results = train.main(tiny_args(faces_with_votes, "ferplus-soft", 16))
    torch.set_num_threads(1)
    log = capsys.readouterr().out
    assert "with FER+ labels (ferplus-soft)" in log
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["class_names"] == ckpt["config"]["class_names"] == list(data.FERPLUS_CLASS_NAMES)
    assert ckpt["config"]["num_classes"] == 8
    assert ckpt["args"]["labels"] == "ferplus-soft"

    # eval.py: the test split with the checkpoint's data, labels and vote file, no flag; majority labels
    acc = evaluate.main([str(out / "best.pt"), "--tta", "none"])
    report = capsys.readouterr().out
    assert acc == pytest.approx(results["test_acc_none"], abs=1e-12)
    _, test_majority = data.ferplus_targets(data.load_fer2013(faces_with_votes / "faces.npz",
                                                              ferplus=faces_with_votes / "fer2013new.csv")["test"][1],
                                            "majority")
    assert f"of {len(test_majority)}" in report
    for name in data.FERPLUS_CLASS_NAMES:
        assert any(line.split()[:1] == [name] for line in report.split("confusion matrix")[0].splitlines())
    assert report.split("confusion matrix")[1].splitlines()[1].split() == [n[:5] for n in data.FERPLUS_CLASS_NAMES]
    assert os.path.exists(out / "confusion_test.png")

    face = tmp_path / "face.png"
    Image.fromarray(data.load_fer2013(faces_with_votes / "faces.npz")["test"][0][0].numpy()).save(face)
    probs = predict.main([str(out / "best.pt"), str(face)])
    lines = capsys.readouterr().out.splitlines()
    assert probs.shape == (1, 8) and lines[0].split() == ["file", "frame", "box", "top", *data.FERPLUS_CLASS_NAMES]


def test_class_names_of_old_and_bad_checkpoints_in_predict_and_eval(tmp_path, capsys):
    model = EmoNeXt.from_size("atto", img_size=32, in_chans=1)
    config = {k: v for k, v in config_dict(model).items() if k != "class_names"}  # from before the config had them
    state = {"config": config, "ema": model.state_dict(), "args": {"model": "atto"}}
    face = tmp_path / "face.png"
    Image.fromarray(faces(1)[0]).save(face)
    torch.save(state, tmp_path / "old.pt")  # from before checkpoints stored class names: FER2013's 7
    probs = predict.main([str(tmp_path / "old.pt"), str(face)])
    assert probs.shape == (1, 7) and capsys.readouterr().out.split()[4:11] == list(emonext.FER2013_CLASS_NAMES)
    torch.save({**state, "class_names": list(data.FERPLUS_CLASS_NAMES)}, tmp_path / "bad.pt")
    for script in (predict, evaluate):
        with pytest.raises(SystemExit) as e:
            script.main([str(tmp_path / "bad.pt"), *([str(face)] if script is predict else [])])
        assert str(e.value.code).startswith(f"{script.__name__}.py: {tmp_path / 'bad.pt'}: 8 class names")

# -----------------------------------------------------------------------------
# the real FER+ file


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FERPLUS_CSV), reason="needs ../shared/data/fer2013new.csv")
def test_real_ferplus_privatetest_majority():
    fp = data.load_ferplus_votes(FERPLUS_CSV)
    assert fp.votes.shape == (35887, 10) and int(fp.dropped.sum()) == 173
    private = (fp.split == "test") & ~fp.dropped
    keep, y = data.ferplus_targets(torch.from_numpy(fp.votes[private]), "majority")
    assert len(y) == 3153
    counts = dict(zip(data.FERPLUS_CLASS_NAMES, torch.bincount(y, minlength=8).tolist()))
    assert counts == {"neutral": 1090, "happiness": 893, "surprise": 396, "sadness": 384, "anger": 273,
                      "fear": 83, "disgust": 18, "contempt": 16}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FER2013_NPZ) or not os.path.exists(FERPLUS_CSV),
                    reason="needs ../shared/data/fer2013.npz and fer2013new.csv")
def test_real_npz_join_matches_the_aligned_votes():
    splits = data.load_fer2013(FER2013_NPZ, ferplus=FERPLUS_CSV)
    with np.load(FER2013_NPZ) as npz, np.load(os.path.join(os.path.dirname(FER2013_NPZ), "ferplus_votes.npz")) as ref:
        for name, prefix in (("train", "train"), ("val", "public_test"), ("test", "private_test")):
            aligned = ref[f"{prefix}_ferplus_votes"]
            joined = aligned[:, 0] >= 0
            assert torch.equal(splits[name][1], torch.from_numpy(aligned[joined].astype(np.int64)))
            assert torch.equal(splits[name][0], torch.from_numpy(npz[f"{prefix}_x"][joined]))
    # one PrivateTest face FER+ kept has no known fer2013.csv row in the npz: 3,152 of the file's 3,153
    _, y = data.ferplus_targets(splits["test"][1], "majority")
    assert len(y) == 3152
