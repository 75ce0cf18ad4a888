"""The real ComfyUI server for the host tier: start on a free loopback port, queue API-format prompts, read results.

``ComfyServer.run(prompt)`` posts to ``/prompt`` with a websocket open, collects that prompt's messages
(``executing``, ``execution_cached``, ``execution_error`` ...) and its ``/history`` entry.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def show(text: str) -> None:
    """A measurement for the test output (``pytest -s``); ComfyUI-style code never prints."""
    sys.stdout.write(text + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """What one queued prompt gave."""

    prompt_id: str | None  # None when /prompt refused it
    http_status: int  # of POST /prompt: 200, or 400 with node_errors
    response: dict  # body of POST /prompt
    messages: list[dict] = field(default_factory=list)  # websocket messages of this prompt, in order
    history: dict = field(default_factory=dict)  # /history/<id>[<id>]

    @property
    def status(self) -> str | None:
        return self.history.get("status", {}).get("status_str")

    @property
    def executed(self) -> list[str]:
        """Node ids the server ran, from the 'executing' messages."""
        return [m["data"]["node"] for m in self.messages if m["type"] == "executing" and m["data"]["node"]]

    @property
    def cached(self) -> list[str]:
        return [n for m in self.messages if m["type"] == "execution_cached" for n in m["data"]["nodes"]]

    @property
    def error(self) -> dict | None:
        errors = [m["data"] for m in self.messages if m["type"] == "execution_error"]
        return errors[0] if errors else None

    @property
    def raised_by_us(self) -> bool:
        """An execution_error whose innermost traceback frame is in this package (nodes/ or hyperlora_core/)."""
        error = self.error
        return bool(error and error.get("traceback")) and "ComfyUI-HyperLoRA" in error["traceback"][-1]

    def outputs(self, node_id: str) -> dict:
        return self.history.get("outputs", {}).get(node_id, {})


class ComfyServer:
    """``python main.py --cpu`` in ComfyUI's folder with every writable directory under ``root``."""

    def __init__(self, comfyui: Path, root: Path, *, startup_timeout: float = 120.0, extra_args: tuple = ()):
        self.comfyui, self.root, self.port = Path(comfyui), Path(root), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "comfyui.log"
        self.tmp = self.root / "tmp"
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)  # more main.py arguments, e.g. --extra-model-paths-config
        self.proc: subprocess.Popen | None = None

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> ComfyServer:
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-api-nodes", "--base-directory", str(self.root), "--preview-method", "none",
               "--database-url", f"sqlite:///{self.root / 'comfyui.db'}", *self.extra_args]
        self.tmp.mkdir(parents=True, exist_ok=True)  # the server's own TMPDIR: what it leaves there is visible
        threads = os.environ.get("OMP_NUM_THREADS", "2")  # MKL too: its own spinning threads on a busy CPU made
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,  # a tiny step 5-10x slower
                   PYTHONUNBUFFERED="1", TMPDIR=str(self.tmp))
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if self.get("/system_stats")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer /system_stats in {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if getattr(self, "log", None) is not None:
            self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP -------------------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str):
        status, body = self.get(path)
        assert status == 200, f"GET {path}: HTTP {status}: {body[:500]!r}"
        return json.loads(body)

    def post(self, path: str, payload: dict, timeout: float = 30.0) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                body = r.read()
                return r.status, json.loads(body) if body else {}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def anon_rss(self) -> int:
        """The anonymous part of its resident memory (tensors, Python objects: what a leak grows), in bytes.

        The rest is file-backed (memory-mapped checkpoints, libraries), which the kernel drops and reloads with
        the machine's memory pressure. Linux only; elsewhere the whole RSS.
        """
        status = Path(f"/proc/{self.proc.pid}/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return self.rss()

    def alive(self) -> bool:
        return self.get("/system_stats", timeout=10)[0] == 200

    # -- prompts ----------------------------------------------------------------------------------------------
    def run(self, prompt: dict, timeout: float = 120.0, on_message=None) -> Run:
        """Queue ``prompt`` and wait for it to finish; a prompt /prompt refuses comes back with its HTTP 400.

        ``on_message(message)`` sees each websocket message of the prompt as it arrives.
        """
        return asyncio.run(self._run(prompt, timeout, on_message))

    async def _run(self, prompt: dict, timeout: float, on_message=None) -> Run:
        import aiohttp

        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}") as ws:
                async with session.post(f"{self.url}/prompt",
                                        json={"prompt": prompt, "client_id": client_id}) as response:
                    body = await response.json()
                    if response.status != 200:
                        return Run(None, response.status, body)
                run = Run(body["prompt_id"], 200, body)
                await asyncio.wait_for(self._collect(ws, run, on_message), timeout)
            run.history = await self._history(session, run.prompt_id, timeout)
        return run

    @staticmethod
    async def _collect(ws, run: Run, on_message=None) -> None:
        import aiohttp

        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue  # previews are binary
            message = json.loads(msg.data)
            data = message.get("data", {})
            if data.get("prompt_id") != run.prompt_id:
                continue
            run.messages.append(message)
            if on_message is not None:
                await asyncio.to_thread(on_message, message)
            kind = message["type"]
            if kind in ("execution_error", "execution_interrupted", "execution_success"):
                return
            if kind == "executing" and data.get("node") is None:
                return

    async def _history(self, session, prompt_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with session.get(f"{self.url}/history/{prompt_id}") as r:
                entry = (await r.json()).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            await asyncio.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} never reached /history")
