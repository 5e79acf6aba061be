"""`ccld serve`: checks its options and the port, loads the models once, serves the page until
stopped, then removes everything it wrote."""

from __future__ import annotations

import argparse
import html
import ipaddress
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from ...errors import CCLDError
from ...limits import SIZE, UPLOAD_MB, WEB_IMAGES
from ...settings import DEFAULT_SIZE
from .page import DEFAULT_NUM_IMAGES, DEFAULT_QUEUE_SIZE, TITLE, build_app
from .requests import DEFAULT_MAX_UPLOAD_MB, KEEP_MINUTES, ResultStore, log


def add_serve_command(sub) -> argparse.ArgumentParser:
    """Adds `ccld serve` to the CLI's subparsers."""
    from ..options import add_model_options

    s = sub.add_parser("serve", help="run the web app (Gradio) on this machine",
                       description="Serve the gallery web app and its API. The models load once "
                       "at start; requests queue and are painted one at a time on a CPU.")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; 0.0.0.0 makes the app "
                        "reachable from the network)")
    s.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    s.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                   help="most requests waiting at once; more are turned away with a message "
                        "(default: %(default)s)")
    s.add_argument("--concurrency", type=int, default=None,
                   help="samplings at once (default: 1 on a CPU, 2 on a GPU)")
    s.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help="largest image upload in MB (default: %(default)s)")
    s.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help="the page's starting width and height in pixels, a multiple of 64 "
                        "(default: %(default)s, the size the models were trained at)")
    s.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES,
                   help="the page's initial number of images (default: %(default)s)")
    s.add_argument("--keep-minutes", type=float, default=KEEP_MINUTES,
                   help="how long results stay downloadable (default: %(default)s)")
    add_model_options(s)
    s.set_defaults(func=cmd_serve)
    return s


def _check_serve_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise CCLDError(f"--port must be from 0 to 65535 (got {args.port})")
    if args.queue_size < 1:
        raise CCLDError(f"--queue-size must be at least 1 (got {args.queue_size})")
    if args.concurrency is not None and args.concurrency < 1:
        raise CCLDError(f"--concurrency must be at least 1 (got {args.concurrency})")
    UPLOAD_MB.check("--max-upload-mb", args.max_upload_mb)
    SIZE.check("--size", args.size)
    WEB_IMAGES.check("--num-images", args.num_images)
    if not (math.isfinite(args.keep_minutes) and args.keep_minutes > 0):
        raise CCLDError(f"--keep-minutes must be a positive number (got {args.keep_minutes})")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    """Fails now, not after the models have loaded, when the address is taken."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CCLDError(f"--host {host!r} is not an address of this machine ({e.strerror}); "
                        "use 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            reason = "in use" if e.errno in (98, 48, 10048) else (e.strerror or str(e))
            raise CCLDError(f"cannot listen on {host}:{port} ({reason}); pass another --port, "
                            "or stop the program using it") from None


def _log_to_stderr() -> None:
    """The server's own log lines on stderr, marked as ccld serve's, and nothing of Gradio's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ccld serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # Gradio's internal deprecation notices and unclosed event loops are not the user's concern.
    warnings.filterwarnings("ignore", category=ResourceWarning)
    warnings.filterwarnings("ignore", module=r"gradio(_client)?(\.|$)")


def _keep_gradio_private(workdir: Path) -> None:
    """Sets Gradio up (through its environment variables, read at import) so that nothing leaves
    this machine and its files stay in `workdir`, which the server removes at exit."""
    # No analytics, no version check, no share links: nothing leaves this machine.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_RUN_HISTORY", "False")
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")  # the queue's local statistics
    if "GRADIO_TEMP_DIR" not in os.environ:  # Gradio's upload and result cache
        os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")


def _require_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CCLDError("the web app needs Gradio; install it with pip install 'ccld[web]'") from None


def _load_models(args):
    """(the pipeline, loaded once; how many samplings may run at once on its device)."""
    from ..options import load_pipeline

    log.info("loading the models ...")
    t0 = time.perf_counter()
    pipe = load_pipeline(args)
    concurrency = args.concurrency or (1 if pipe.device.type in ("cpu", "mps") else 2)
    log.info("models loaded in %.1f s on %s (%s); %d sampling(s) at once, queue of %d",
             time.perf_counter() - t0, pipe.device,
             ", ".join(f"{k}: {v}" for k, v in pipe.sources.items()), concurrency,
             args.queue_size)
    return pipe, concurrency


class _PageTitle:
    """ASGI middleware putting a `<title>` into the served page itself: Gradio sets it from a
    script, so tabs, bookmarks and link previews that read the HTML saw none."""

    def __init__(self, app, title: str):
        self.app = app
        self.tag = f"<title>{html.escape(title)}</title>".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/" or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        start, body = None, []

        async def send_with_title(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return
            page = b"".join(body)
            headers = start["headers"]
            html_page = any(k.lower() == b"content-type" and v.startswith(b"text/html")
                            for k, v in headers)
            if html_page and b"<title" not in page:
                page = page.replace(b"<head>", b"<head>" + self.tag, 1)
                headers = [(k, str(len(page)).encode() if k.lower() == b"content-length" else v)
                           for k, v in headers]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": page})

        await self.app(scope, receive, send_with_title)


def _title_middleware():
    from starlette.middleware import Middleware

    return Middleware(_PageTitle, title=TITLE)


def _launch(demo, args, max_upload_bytes: int) -> None:
    """Starts serving `demo` in Gradio's threads and says where; an address it cannot listen on
    is a CCLDError."""
    if not _is_loopback(args.host):
        log.warning("listening on %s: anyone who can reach this machine can use the app",
                    args.host)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False,
                    inbrowser=False, prevent_thread_lock=True, show_error=True,
                    max_file_size=max_upload_bytes, allowed_paths=[str(demo.ccld_store.root)],
                    ssr_mode=False, mcp_server=False, pwa=False, run_history=False,
                    enable_monitoring=False, footer_links=["api"], quiet=True,
                    css=demo.ccld_css, app_kwargs={"middleware": [_title_middleware()]})
    except OSError as e:
        reason = " ".join(str(e).split(". ")[:1]).strip()
        raise CCLDError(f"cannot listen on {args.host}:{args.port} ({reason}); pass another "
                        "--port or --host") from None
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    if ":" in host:
        host = f"[{host}]"
    port = demo.server_port if getattr(demo, "server_port", None) else args.port
    log.info("ready: open http://%s:%d/ (Ctrl+C stops)", host, port)


def _wait_for_stop() -> None:
    """Returns on SIGTERM or Ctrl+C; meanwhile the server runs in Gradio's threads."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass


def _close(demo) -> None:
    if demo is None:
        return
    try:
        demo.close()
    except Exception:  # noqa: BLE001 - best effort at shutdown
        pass


def cmd_serve(args) -> int:
    """`ccld serve`: checks the options and the port before the slow model loading, serves until
    stopped, then removes everything it wrote."""
    _check_serve_args(args)
    _check_port_free(args.host, args.port)
    _log_to_stderr()
    workdir = Path(tempfile.mkdtemp(prefix="ccld-serve-"))
    _keep_gradio_private(workdir)
    demo = None
    try:
        _require_gradio()
        pipe, concurrency = _load_models(args)
        store = ResultStore(workdir / "results", max_age=args.keep_minutes * 60)
        log.info("scratch folder %s (removed at exit)", workdir)
        max_upload_bytes = int(args.max_upload_mb * 1e6)
        demo = build_app(pipe, store=store, concurrency=concurrency, queue_size=args.queue_size,
                         size=args.size, max_upload_bytes=max_upload_bytes,
                         keep_minutes=args.keep_minutes, num_images=args.num_images)
        _launch(demo, args, max_upload_bytes)
        _wait_for_stop()
        log.info("stopping")
        return 0
    finally:
        _close(demo)
        shutil.rmtree(workdir, ignore_errors=True)
