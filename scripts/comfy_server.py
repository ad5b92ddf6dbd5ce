"""Start a real ComfyUI server on 127.0.0.1, run an API-format graph on it with progress, stop it by its PID.

Used by mace_erase.py and the server and browser tests; run on its own (python3 scripts/comfy_server.py) it keeps
the host's UI open on port 8188. Needs only the standard library, aiohttp and tqdm (both ComfyUI dependencies).
"""

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

log = logging.getLogger("mace-erase")
HERE = Path(__file__).resolve().parent


def default_host() -> Path:
    return Path(os.environ.get("COMFYUI_PATH", Path.home() / "comfy" / "ComfyUI")).expanduser()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


class ComfyServer:
    def __init__(self, host: Path | None = None, port: int | None = None, extra_args=(), log_file=None):
        self.host = Path(host or default_host())
        if not (self.host / "main.py").is_file():
            raise SystemExit(f"No ComfyUI at {self.host}: run `bash scripts/setup.sh` or set COMFYUI_PATH.")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.log_file = log_file
        self.proc = None

    def __enter__(self):
        args = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", *self.extra_args]
        if not has_cuda():
            args.append("--cpu")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE / "shim"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        out = open(self.log_file, "w") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, cwd=self.host, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting"
                                   + (f"; see {self.log_file}" if self.log_file else ""))
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("ComfyUI did not start within 180 s")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"ComfyUI refused the graph: {e.read().decode(errors='replace')[:2000]}") from None

    def run(self, graph: dict, timeout: float = 3600, show_progress: bool = True) -> dict:
        """Queue the graph, follow its progress over the websocket, return its history entry."""
        client_id = uuid.uuid4().hex
        return asyncio.run(self._run(graph, client_id, timeout, show_progress))

    async def _run(self, graph, client_id, timeout, show_progress):
        import aiohttp
        from tqdm import tqdm

        bar = None
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}") as ws:
                prompt_id = self.post("/prompt", {"prompt": graph, "client_id": client_id})["prompt_id"]
                deadline = time.time() + timeout
                while time.time() < deadline:
                    try:
                        msg = await ws.receive(timeout=5)
                    except asyncio.TimeoutError:
                        msg = None
                    if msg is not None and msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        kind, body = data.get("type"), data.get("data", {})
                        if kind == "executing" and body.get("node") and show_progress:
                            node = graph.get(body["node"], {}).get("class_type", body["node"])
                            log.info("running %s", node)
                        elif kind == "progress" and show_progress:
                            if bar is None or bar.total != body["max"]:
                                if bar:
                                    bar.close()
                                bar = tqdm(total=body["max"], leave=False, file=sys.stderr)
                            bar.n = body["value"]
                            bar.refresh()
                        elif kind in ("execution_error", "execution_interrupted"):
                            break
                        elif kind == "executing" and body.get("node") is None and body.get("prompt_id") == prompt_id:
                            break
                    history = self.get(f"/history/{prompt_id}")
                    if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                        if history[prompt_id]["status"].get("status_str") in ("success", "error"):
                            break
        if bar:
            bar.close()
        for _ in range(20):
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.5)
        raise RuntimeError("the graph did not finish in time")


def error_text(entry: dict) -> str | None:
    """The node error of a failed run, as ComfyUI reported it, or None on success."""
    status = entry.get("status", {})
    if status.get("status_str") == "success":
        return None
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '').strip()}"
    return f"run ended with status {status.get('status_str')}"


def main():
    """Open the UI: start the host ComfyUI (the pack linked into its custom_nodes by setup.sh) and keep it running."""
    import argparse

    ap = argparse.ArgumentParser(prog="comfy_server", description=main.__doc__)
    ap.add_argument("--port", type=int, default=8188, help="port on 127.0.0.1 (default 8188)")
    ap.add_argument("--host", type=Path, default=None, help="the ComfyUI folder (default: $COMFYUI_PATH or "
                                                            "~/comfy/ComfyUI)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # SIGTERM (kill, timeout) must leave through the with-block too, or the server, in its own session, outlives us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with ComfyServer(host=args.host, port=args.port) as server:
        log.info("ComfyUI is at %s : the MACE workflows are under Workflow > Browse Templates. Ctrl-C stops it.",
                 server.url)
        try:
            server.proc.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
