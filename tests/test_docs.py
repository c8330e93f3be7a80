"""The docs against the code and the record. The blocks marked `<!-- runs -->` in README.md and docs/ run as written,
in order, on a clean copy of the repository (its tracked files: the shipped weights, no out/), leave the shipped
files as they were and write under out/ only; README's results table and the model cards give weights/results.json's
numbers; docs/training.md's defaults table gives train.py's parser defaults; every relative link and every pointer a
script gives to a docs section lands on something that exists."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import synthetic
import train
from conftest import ROOT
from emonext import EmoNeXt, grey_faces

DOCS = ("README.md", "BENCHMARKS.md", "docs/training.md", "docs/inference.md", "weights/README.md")
RESULTS = json.load(open(os.path.join(ROOT, "weights", "results.json")))
FENCE = re.compile(r"^(<!-- runs -->\n)?```(\w*)\n(.*?)^```$", re.M | re.S)


def read(doc):
    with open(os.path.join(ROOT, doc)) as f:
        return f.read()


def runnable_blocks(doc):
    """[(language, code)] of the doc's fenced blocks marked runnable by a `<!-- runs -->` line just above them."""
    return [(lang, code) for mark, lang, code in FENCE.findall(read(doc)) if mark]


def section(text, heading):
    """The text under a markdown heading, up to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(heading)}\n", text, re.M)
    assert m, f"no heading {heading!r}"
    end = re.compile(rf"^#{{1,{len(m[1])}}} ", re.M).search(text, m.end())
    return text[m.end():end.start() if end else len(text)]


def table_rows(text):
    """The cells of each markdown table row in text, stripped."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc):
    return {slug(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", read(doc)), re.M)}


def clean_copy(dest):
    """The repository's files as a fresh clone has them (tracked, or new and not ignored) copied to dest."""
    try:
        listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git, to list the repository's files")
    files = [f for f in listed if f and os.path.isfile(os.path.join(ROOT, f))]
    for f in files:
        os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    return set(files)


def snapshot(root):
    return {os.path.relpath(p, root): os.path.getmtime(p) for p in glob.glob(f"{root}/**", recursive=True)
            if os.path.isfile(p)}


@pytest.mark.slow
@pytest.mark.parametrize("doc", ["README.md", "docs/inference.md"])
def test_the_blocks_marked_runnable_run_as_written_on_a_clean_copy(doc, tmp_path):
    """Slow: the README's blocks make a scene, find and classify its faces, run the Python and onnxruntime snippets and
    export an ONNX file (about 30 s on 2 cores)."""
    pytest.importorskip("cv2")
    pytest.importorskip("onnxruntime")
    blocks = runnable_blocks(doc)
    assert blocks, f"{doc} marks no block runnable"
    files = clean_copy(tmp_path)
    before = snapshot(tmp_path)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONDONTWRITEBYTECODE="1")  # no __pycache__ beside the copied scripts
    for lang, code in blocks:
        command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{doc}, this {lang} block failed:\n{code}\n{done.stdout}\n{done.stderr}"
    after = snapshot(tmp_path)
    changed = [f for f in before if after.get(f) != before[f]]
    assert not changed, f"{doc}'s blocks changed or removed files of the repository: {changed}"
    made = sorted(set(after) - files)
    assert made and all(f.startswith("out" + os.sep) for f in made), made


def test_the_onnx_snippet_frames_the_face_as_emonext_and_gives_its_probabilities(tmp_path, capsys, monkeypatch):
    """README's onnxruntime + numpy + Pillow lines on a face PNG (RGB, not square, larger than 48): the face they make
    is grey_faces' to within a grey level, and their probabilities are the shipped model's to int8 precision."""
    pytest.importorskip("onnxruntime")
    (code,) = [code for lang, code in runnable_blocks("README.md") if "onnxruntime" in code]
    face = synthetic.synthetic_faces(n_train=1, n_val=0, n_test=0, seed=5)["train"][0][0].numpy()
    photo = np.stack([face, face // 2 + 100, 255 - face], -1)  # colours, so the grey conversion counts
    (tmp_path / "out").mkdir()
    Image.fromarray(photo).resize((100, 130)).save(tmp_path / "out" / "face.png")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code.replace('"weights/', f'"{ROOT}/weights/'), scope)
    image = np.asarray(Image.open(tmp_path / "out" / "face.png"))
    assert np.abs(scope["face"].astype(int) - grey_faces(image)[0].numpy().astype(int)).max() <= 1
    probs = torch.from_numpy(scope["probs"])
    model = EmoNeXt.from_checkpoint(os.path.join(ROOT, "weights", "emonext_atto_fer2013.pt"))
    assert probs.shape == (7,) and abs(probs.sum().item() - 1) < 1e-5
    assert (probs - model.predict(image)[0]).abs().max() < 0.2
    assert capsys.readouterr().out.split()[0] == scope["names"][probs.argmax()]


def percent(value):
    return f"{value:.2f}%"


def test_readme_results_table_gives_the_recorded_numbers():
    rows = {cells[0].split("`")[1]: cells for cells in table_rows(section(read("README.md"), "Results"))
            if cells[0].startswith("`weights/")}
    assert set(rows) == set(RESULTS)
    for path, record in RESULTS.items():
        stated = dict((kind, value) for value, kind in re.findall(r"\*\*([\d.]+%)\*\* (plain|ten-crop)",
                                                                   " ".join(rows[path])))
        recorded = {"plain": record["accuracy"]["plain"], "ten-crop": record["accuracy"]["tencrop"]}
        assert stated == {k: percent(v) for k, v in recorded.items() if v is not None}, path
        mib = re.search(r"([\d.]+) MiB", rows[path][0])
        assert mib and float(mib[1]) == round(record["bytes"] / 2**20, 1), path


def test_each_model_card_gives_the_recorded_file_and_numbers():
    cards = read("weights/README.md")
    for path, record in RESULTS.items():
        facts = {cells[0]: cells[1] for cells in table_rows(section(cards, f"`{path}`")) if len(cells) == 2}
        assert facts["sha256"] == f"`{record['sha256']}`", path
        assert facts["size"] == f"{record['bytes']:,} bytes", path
        assert facts["PrivateTest faces"] == f"{record['faces']:,}", path
        for kind, name in (("plain", "plain"), ("tencrop", "ten-crop")):
            value = record["accuracy"][kind]
            assert facts.get(f"PrivateTest, {name}") == (percent(value) if value is not None else None), (path, kind)
        assert facts["evaluated by"] == f"`{record['eval']}`", path


def test_the_defaults_table_gives_the_parsers_defaults():
    """docs/training.md's table of train.py's defaults against the official code: the value it gives for each flag
    (its first word) is the one parse_args gives; a flag whose default is worked out at run time says so in words."""
    rows = [cells for cells in table_rows(section(read("docs/training.md"), "The defaults and the official code"))
            if cells[0].startswith("`--")]
    assert len(rows) >= 15
    defaults = vars(train.build_parser().parse_args([]))
    for cells in rows:
        flag = cells[0].strip("`")
        value, stated = defaults[flag[2:].replace("-", "_")], cells[1].split()[0].strip("`,;")
        if isinstance(value, bool):
            assert stated == ("on" if value else "off"), flag
        elif isinstance(value, (int, float)):
            assert float(stated) == value, flag
        elif value is not None:
            assert stated == value, flag


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_lands_on_a_file_and_heading_that_exist(doc):
    text = FENCE.sub("", read(doc))
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"\w+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        assert os.path.exists(os.path.join(ROOT, target)), f"{doc}: {link}"
        if anchor:
            assert anchor in anchors(target), f"{doc}: {link}"


SCRIPTS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/*.py") + glob.glob(f"{ROOT}/tools/*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_scripts_pointers_to_a_docs_section_name_one_that_exists(script):
    """A docstring's or comment's `README.md, "Heading"` (or BENCHMARKS.md's, docs/*.md's) names a real heading."""
    with open(os.path.join(ROOT, script)) as f:
        pointers = re.findall(r"((?:README|BENCHMARKS|docs/\w+)\.md), \"([^\"]+)\"", f.read())
    for doc, heading in pointers:
        assert slug(heading) in anchors(doc), f"{script}: {doc}, {heading!r}"


COMMAND = re.compile(r"^\s*(?:[A-Z_]+=\S+ )*(?:python -m (bench|studies|tools\.\w+)|python (\w+)\.py|"
                     r"torchrun .*?(train)\.py)\b(.*)$", re.M)


def commands(text):
    """[(script, flags)] of each command line in text that runs one of the repository's scripts; a line ending in a
    backslash goes on on the next."""
    text = text.replace("\\\n", " ")
    return [((m[1] or m[2] or m[3]).replace(".", "/") + ".py", re.findall(r"(?<![\w-])--[a-z][\w-]*", m[4]))
            for m in COMMAND.finditer(text)]


_HELP = {}


def known_flags(script):
    """The flags `python -m SCRIPT --help` lists."""
    if script not in _HELP:
        assert os.path.exists(os.path.join(ROOT, script)), f"{script} does not exist"
        done = subprocess.run([sys.executable, "-m", script[:-3].replace("/", "."), "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{script} --help: {done.stderr[-500:]}"
        _HELP[script] = set(re.findall(r"--[a-z][\w-]*", done.stdout))
    return _HELP[script]


def docstring_commands(script):
    with open(os.path.join(ROOT, script)) as f:
        text = f.read()
    m = re.match(r'\s*(?:#.*\n)*\s*"""(.*?)"""', text, re.S)
    return commands(m[1]) if m else []


@pytest.mark.parametrize("source", DOCS + tuple(SCRIPTS))
def test_every_command_shown_uses_flags_its_script_has(source):
    """The command lines in the docs' code blocks, and in the scripts' docstrings, name scripts that exist and flags
    that their parsers know."""
    if source.endswith(".md"):
        shown = [c for _, lang, code in FENCE.findall(read(source)) if lang in ("bash", "") for c in commands(code)]
    else:
        shown = docstring_commands(source)
    for script, flags in shown:
        unknown = [f for f in flags if f not in known_flags(script) and f != "--help"]
        assert not unknown, f"{source}: {script} has no {unknown}"
