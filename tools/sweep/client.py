"""One ComfyUI server as the sweep sees it: HTTP (aiohttp) for /object_info, /prompt, /history, /queue, /view,
and its websocket (/ws?clientId=...) for progress and early completion notices."""
from __future__ import annotations

import asyncio
import json
from urllib.parse import urlencode

import aiohttp

REQUEST_TIMEOUT_S = 60.0
DOWN_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, ConnectionError)
DONE_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class ServerDown(RuntimeError):
    """The server did not answer (refused, reset, timed out, 5xx): retry later or elsewhere."""


class PromptRefused(RuntimeError):
    """The server answered /prompt with a validation error: the job itself is wrong."""


class Server:
    def __init__(self, url: str, client_id: str, session: aiohttp.ClientSession):
        self.url = url.rstrip("/")
        self.client_id = client_id
        self.session = session
        self.progress: dict[str, tuple[int, int]] = {}  # prompt id -> (step, steps) from "progress" messages
        self._wakeups: dict[str, asyncio.Event] = {}

    # -- HTTP -------------------------------------------------------------------
    async def _get(self, path: str, *, raw: bool = False, timeout: float = REQUEST_TIMEOUT_S):
        try:
            async with self.session.get(self.url + path, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                if r.status >= 500:
                    raise ServerDown(f"{self.url}{path}: HTTP {r.status}")
                r.raise_for_status()
                return await r.read() if raw else await r.json(content_type=None)
        except DOWN_ERRORS as e:
            raise ServerDown(f"{self.url}: {type(e).__name__}: {e}") from None

    async def object_info(self) -> dict:
        return await self._get("/object_info")

    async def alive(self) -> bool:
        try:
            await self._get("/system_stats", timeout=5)
            return True
        except (ServerDown, aiohttp.ClientResponseError):
            return False

    async def submit(self, prompt: dict, prompt_id: str, extra: dict) -> None:
        """POST /prompt with our client id and prompt id (so a resumed runner can find it again)."""
        payload = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id, "extra_data": extra}
        try:
            async with self.session.post(self.url + "/prompt", json=payload,
                                         timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as r:
                body = await r.text()
                if r.status >= 500:
                    raise ServerDown(f"{self.url}/prompt: HTTP {r.status}")
                if r.status != 200:
                    raise PromptRefused(f"{self.url} refused the prompt (HTTP {r.status}): {body[:2000]}")
                data = json.loads(body)
                if data.get("node_errors"):
                    raise PromptRefused(f"{self.url} refused nodes: {json.dumps(data['node_errors'])[:2000]}")
        except DOWN_ERRORS as e:
            raise ServerDown(f"{self.url}: {type(e).__name__}: {e}") from None

    async def history(self, prompt_id: str) -> dict | None:
        """The finished /history entry of a prompt, or None while it is queued, running, or unknown."""
        entry = (await self._get(f"/history/{prompt_id}")).get(prompt_id)
        if entry and (entry.get("status") or {}).get("completed") is not None:
            return entry
        return None

    async def queued(self, prompt_id: str) -> bool:
        """Whether the prompt is running or waiting in the server's queue."""
        q = await self._get("/queue")
        return any(item[1] == prompt_id for item in q.get("queue_running", []) + q.get("queue_pending", []))

    async def view(self, item: dict) -> bytes:
        q = urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                       "type": item.get("type", "output")})
        return await self._get(f"/view?{q}", raw=True)

    # -- websocket ----------------------------------------------------------------
    def wakeup(self, prompt_id: str) -> asyncio.Event:
        return self._wakeups.setdefault(prompt_id, asyncio.Event())

    def forget(self, prompt_id: str) -> None:
        self._wakeups.pop(prompt_id, None)
        self.progress.pop(prompt_id, None)

    async def listen(self) -> None:
        """Follow /ws forever (reconnecting): record step progress, wake the waiter when a prompt ends."""
        ws_url = self.url.replace("http", "ws", 1) + "/ws?" + urlencode({"clientId": self.client_id})
        while True:
            try:
                async with self.session.ws_connect(ws_url, heartbeat=20) as ws:
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            self._on_message(json.loads(msg.data))
            except (*DOWN_ERRORS, aiohttp.WSServerHandshakeError):
                pass
            for event in self._wakeups.values():  # a dropped socket: let waiters look at /history now
                event.set()
            await asyncio.sleep(1.0)

    def _on_message(self, message: dict) -> None:
        kind, data = message.get("type"), message.get("data") or {}
        pid = data.get("prompt_id")
        if pid is None:
            return
        if kind == "progress":
            self.progress[pid] = (int(data.get("value", 0)), int(data.get("max", 0)))
        elif kind in DONE_EVENTS or (kind == "executing" and data.get("node") is None):
            self.wakeup(pid).set()
