"""figures.py: the charts drawn with pillow alone: a confusion matrix's cells, the STN pairs' layout, training
curves; and that importing it pulls in no torch."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

import figures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_confusion_matrix_cells_are_shaded_by_their_share_of_the_row():
    img = figures.confusion_matrix([[5, 1], [0, 3]], ("left", "right"), cell=40)
    assert img.size == (80 + 2 * 40 + 10,) * 2
    rgb = img.convert("RGB")
    assert rgb.getpixel((80 + 40 + 2, 80 + 2)) == (212, 212, 255)  # row 0, col 1: 1 of 6
    assert rgb.getpixel((80 + 2, 80 + 40 + 2)) == (255, 255, 255)  # row 1, col 0: 0 of 3
    assert rgb.getpixel((80 + 40 + 2, 80 + 40 + 2)) == (0, 0, 255)  # 100% cell: full blue
    assert figures.confusion_matrix([[0, 0], [0, 0]], ("a", "b")).size == (80 + 2 * 64 + 10,) * 2  # no faces: no error


def test_stn_pairs_lay_out_input_and_warp_side_by_side():
    pairs = np.zeros((5, 2, 8, 8), np.uint8)
    pairs[:, 1] = 100
    img = figures.stn_pairs(pairs)
    assert img.mode == "L" and img.size == (4 * (2 * 8 + 8), 2 * (8 + 4))
    px = np.asarray(img)
    assert (px[:8, :8] == 0).all() and (px[:8, 8:16] == 100).all() and (px[:8, 16:24] == 255).all()
    assert (px[12:20, 24:] == 255).all()  # the second row holds one pair: the rest stays white


def test_training_curves_draw_a_panel_each_and_skip_what_is_not_finite():
    rows = [{"epoch": e, "train_loss": 2 - e / 2, "train_acc": e / 4, "val_acc": e / 5, "lr": 1e-3}
            for e in (1, 2, 3)]
    rows[1]["train_loss"] = float("nan")
    img = figures.training_curves(rows)
    assert img.size == (960, 240)
    colours = {c for _, c in img.getcolors(1 << 16)}
    assert set(figures.COLOURS.values()) <= colours
    assert figures.training_curves([]).size == (960, 240)  # no rows yet: the empty panels


def test_figures_imports_no_torch():
    code = "import sys, figures; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=60)
