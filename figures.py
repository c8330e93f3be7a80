"""
The project's PNG charts, drawn with pillow alone (no torch, so a torch-free process can draw them): a training
run's curves (train.py's curves.png), the STN's warps (stn.png), a confusion matrix (eval.py) and a video's
timeline (predict.py --plot). Each function
returns a PIL image; the caller saves it (atomically, emonext.write_atomically).
"""
import math

from PIL import Image, ImageDraw

CURVES = (("train loss", (("train", "train_loss"),)), ("accuracy", (("train", "train_acc"), ("val", "val_acc"))),
          ("learning rate", (("lr", "lr"),)))
COLOURS = {"train": (214, 39, 40), "val": (31, 119, 180), "lr": (44, 160, 44)}
PALETTE = ((214, 39, 40), (140, 86, 75), (148, 103, 189), (44, 160, 44), (31, 119, 180), (255, 127, 14),
           (127, 127, 127), (227, 119, 194))  # a class's line in a timeline, by its index


def training_curves(rows, w=320, h=240):
    """train.py's metrics rows (dicts with epoch, train_loss, train_acc, val_acc, lr) against epochs: a panel each
    for the train loss, train and val accuracy, the lr."""
    img = Image.new("RGB", (len(CURVES) * w, h), "white")
    draw = ImageDraw.Draw(img)
    xs = [r["epoch"] for r in rows]
    for i, (title, series) in enumerate(CURVES):
        draw_panel(draw, i * w, w, h, title, xs, [(name, [r[key] for r in rows]) for name, key in series])
    return img


def draw_panel(draw, left, w, h, title, xs, series, colours=COLOURS, x_name="epoch", x_hi=None, y_range=None, top=0):
    """One panel at (left, top): the title with a legend in the series' colours, axes with their ranges written at
    the ends (x from 0 to x_hi, default the largest x; y over y_range, default the values'), a line per series
    (non-finite values left out)."""
    x0, y0, x1, y1 = left + 56, top + 24, left + w - 16, top + h - 30  # the plot area
    draw.text((x0, top + 6), title, fill="black")
    at = x0 + draw.textlength(title) + 12
    for name, _ in series if len(series) > 1 else ():
        draw.text((at, top + 6), name, fill=colours[name])
        at += draw.textlength(name) + 8
    draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
    values = [v for _, ys in series for v in ys if math.isfinite(v)]
    if not xs or not values:
        return
    lo, hi = y_range or (min(values), max(values))
    hi, x_hi = (hi if hi > lo else lo + 1), max(max(xs) if x_hi is None else x_hi, 1e-9)
    for y, v in ((y0, hi), (y1, lo)):
        label = f"{v:.3g}"
        draw.text((x0 - 4 - draw.textlength(label), y - 5), label, fill="black")
    draw.text((x0, y1 + 4), "0", fill="black")
    label = f"{x_name} {x_hi:.3g}"
    draw.text((x1 - draw.textlength(label), y1 + 4), label, fill="black")
    for name, ys in series:
        points = [(x0 + (x1 - x0) * x / x_hi, y1 - (y1 - y0) * (y - lo) / (hi - lo))
                  for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colours[name], width=2)
        for px, py in points[-1:]:  # the last value, also when it is the only one
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colours[name])


def stn_pairs(pairs, cols=4):
    """Faces beside what the STN made of them: pairs is uint8 (B, 2, S, S) (numpy), [:, 0] the input and [:, 1]
    the warp; `cols` pairs per row, grey, on white."""
    b, _, s, _ = pairs.shape
    rows = (b + cols - 1) // cols
    img = Image.new("L", (cols * (2 * s + 8), rows * (s + 4)), 255)
    for i in range(b):
        r, col = divmod(i, cols)
        for k in range(2):
            img.paste(Image.fromarray(pairs[i, k]), (col * (2 * s + 8) + k * s, r * (s + 4)))
    return img


def confusion_matrix(counts, class_names, cell=64):
    """The row-normalised confusion matrix (counts: k lists of k ints, row = true class, column = predicted) as a
    heat map with each cell's count and share of its row."""
    k, margin = len(class_names), 80
    img = Image.new("RGB", (margin + k * cell + 10, margin + k * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    for i in range(k):
        draw.text((4, margin + i * cell + cell // 2 - 5), class_names[i], fill="black")
        draw.text((margin + i * cell + 4, margin - 28 + (i % 2) * 12), class_names[i], fill="black")
        total = max(1, sum(counts[i]))
        for j in range(k):
            rate = counts[i][j] / total
            shade = int(255 * (1 - rate))
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1, margin + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            text = f"{int(counts[i][j])}\n{100 * rate:.0f}%"
            draw.multiline_text((box[0] + 6, box[1] + 14), text, fill="black" if shade > 110 else "white")
    draw.text((4, 4), "true (rows) vs predicted (columns)", fill="black")
    return img


def video_timeline(tracks, class_names, w=720, h=180):
    """A video's faces over time (predict.py --plot): a panel per track, {track id: (times in s, probabilities
    (T, num_classes) as lists)}, in id order, each class's probability 0..1 a line in its PALETTE colour, the time
    axes shared."""
    img = Image.new("RGB", (w, h * max(1, len(tracks))), "white")
    draw = ImageDraw.Draw(img)
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(class_names)}
    x_hi = max((max(times) for times, _ in tracks.values() if times), default=0)
    for row, (track, (times, probs)) in enumerate(sorted(tracks.items())):
        series = [(name, [p[k] for p in probs]) for k, name in enumerate(class_names)]
        draw_panel(draw, 0, w, h, f"track #{track}", times, series, colours, "time (s)", x_hi, (0.0, 1.0), top=row * h)
    return img

