"""Warm processes for the docs test: `ccld` commands and Python snippets start in a fork of one
process that has already imported torch (with torch._dynamo), ccld and accelerate, instead of
paying those imports (seconds on a small machine) in every one of the docs' ~50 processes.

    python warm_processes.py serve SOCKET        # the server: imports, then forks per command
    python warm_processes.py ccld ARGS...        # a client: runs `ccld ARGS...` in a fork
    python warm_processes.py python SCRIPT ARGS  # a client: runs a Python script in a fork

A client hands the server its argv, working folder, environment and its stdin, stdout and
stderr (the descriptors themselves), and exits with the command's exit status, or dies of the
same signal. Each command runs in a fresh fork of the imported server, as `ccld`'s console
script or `python SCRIPT` would run it: `sys.argv`, the folder and the environment are the
client's, `__name__` is "__main__". What is read at import time (torch's thread count) is the
server's, started with the same environment.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

HEADER = struct.Struct("!I")


def _send_all(conn: socket.socket, payload: bytes, fds=()) -> None:
    message = HEADER.pack(len(payload)) + payload
    socket.send_fds(conn, [message], list(fds))


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
        more = conn.recv(1 << 16)
        if not more:
            raise EOFError("the client hung up")
        data += more
    (length,) = HEADER.unpack_from(data)
    return json.loads(data[HEADER.size:HEADER.size + length]), fds


def _run_command(request: dict) -> None:
    """In the command's own process: becomes it, and never returns."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    code = 0
    try:
        if request["kind"] == "ccld":
            from ccld.apps.cli import entry

            entry()  # as the console script: it may end the process itself
        else:
            import runpy

            sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _serve_one(conn: socket.socket) -> None:
    """In a fork of the server: runs one client's command in a fork of its own and reports how
    it ended (a plain wait: the command may end itself with os._exit)."""
    request, fds = _receive(conn)
    pid = os.fork()
    if pid == 0:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        _run_command(request)
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    _send_all(conn, json.dumps({"status": status}).encode())
    os._exit(0)


def serve(path: str) -> None:
    import torch  # noqa: F401 - what every command would import first
    import torch._dynamo  # noqa: F401 - a torch optimizer's first use imports it: 2 s here
    from accelerate import Accelerator  # noqa: F401 - the training commands': seconds alone

    import ccld.apps.cli  # noqa: F401
    import ccld.pipeline  # noqa: F401
    import ccld.training.commands  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the per-client forks reap themselves
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _serve_one(conn)
        conn.close()


def client(kind: str, argv: list[str]) -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(os.environ["CCLD_WARM_SOCKET"])
    env = {k: v for k, v in os.environ.items()}
    request = {"kind": kind, "argv": argv, "cwd": os.getcwd(), "env": env}
    _send_all(conn, json.dumps(request).encode(), [0, 1, 2])
    reply, _ = _receive(conn)
    status = reply["status"]
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    sys.exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif sys.argv[1] == "ccld":
        client("ccld", ["ccld", *sys.argv[2:]])
    else:
        client("python", sys.argv[2:])
