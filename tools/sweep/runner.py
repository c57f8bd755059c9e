"""Run a sweep's jobs across ComfyUI servers: one job in flight per server, a server that stops answering is
retried with backoff while its job goes back to the shared queue, results are keyed (never recorded twice),
and state.json keeps the prompt id of every job in flight, written BEFORE it is submitted, so a killed runner
resumed with --resume asks the server about it instead of submitting it again."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from . import grid as G
from . import report
from .client import PromptRefused, Server, ServerDown

STATE_FILE = "state.json"
RESULTS_FILE = "results.jsonl"
LOG_FILE = "sweep.log"
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
POLL_S = 1.0


class SweepAborted(RuntimeError):
    """Every server stayed down longer than the server timeout; the state is kept for --resume."""


@dataclass
class SweepSpec:
    workflow: dict
    grid: list[str]
    servers: list[str]
    out: Path
    seeds: list[int] | None = None
    seed_inputs: list[str] | None = None
    job_timeout_s: float = 3600.0
    server_timeout_s: float = 600.0
    progress: bool = True


@dataclass
class _Run:
    spec: SweepSpec
    axes: list
    jobs: list
    seeds_to: list
    state: dict
    results: dict = field(default_factory=dict)   # key -> row (this run's and earlier ok rows)
    down_since: dict = field(default_factory=dict)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    bar: object = None


def _signature(workflow: dict, axes: list, seeds) -> str:
    blob = json.dumps({"workflow": workflow, "axes": [[a.label, list(map(repr, a.values))] for a in axes],
                       "seeds": seeds}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def _object_infos(servers: list[Server]) -> dict[str, dict]:
    infos = {}
    for s in servers:
        try:
            infos[s.url] = await s.object_info()
        except ServerDown as e:
            raise G.GridError(f"server {s.url} does not answer ({e}): start it or leave it out of --server") from None
    return infos


def _node_names(workflow: dict) -> dict[str, str]:
    titles = {nid: (n.get("_meta") or {}).get("title") or n.get("class_type", nid) for nid, n in workflow.items()}
    counts = {}
    for t in titles.values():
        counts[t] = counts.get(t, 0) + 1
    return {nid: t if counts[t] == 1 else f"{t}#{nid}" for nid, t in titles.items()}


def _execution_s(entry: dict) -> float | None:
    stamps = {event: data.get("timestamp") for event, data in (entry.get("status") or {}).get("messages", [])}
    start, end = stamps.get("execution_start"), stamps.get("execution_success") or stamps.get("execution_error")
    return None if start is None or end is None else (end - start) / 1000.0


def _error_text(entry: dict) -> str:
    for event, data in (entry.get("status") or {}).get("messages", []):
        if event == "execution_error":
            return f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_message', '')}".strip()
    return f"prompt ended with status {(entry.get('status') or {}).get('status_str')}"


class _Runner:
    def __init__(self, run: _Run, servers: list[Server]):
        self.run, self.servers = run, servers
        self.names = _node_names(run.spec.workflow)
        self.out = run.spec.out

    # -- bookkeeping -------------------------------------------------------------------
    def log(self, text: str, *, show: bool = False) -> None:
        """One line in sweep.log (submissions, adoptions, servers lost and back); `show` also prints it."""
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        if show and self.run.bar is not None:
            self.run.bar.write(f"sweep: {text}")

    def save_state(self) -> None:
        _write_json_atomic(self.out / STATE_FILE, self.run.state)

    def finished(self) -> bool:
        return all(j.key in self.run.results for j in self.run.jobs)

    async def record(self, server: Server, job: G.Job, pid: str, entry: dict | None, error: str | None) -> None:
        if job.key in self.run.results:  # a duplicate run (requeued after a server loss that had finished it)
            if self.run.state["in_flight"].get(job.key, {}).get("prompt_id") == pid:
                self.run.state["in_flight"].pop(job.key)
                self.save_state()
            return
        flight = self.run.state["in_flight"].get(job.key, {})
        row = {"key": job.key, "label": job.label(), "params": dict(job.params), "seed": job.seed,
               "server": server.url, "prompt_id": pid, "status": "ok", "error": None, "images": [], "metrics": {},
               "submitted_at": flight.get("submitted_at"), "finished_at": time.time()}
        if entry is not None:
            if (entry.get("status") or {}).get("status_str") != "success":
                error = _error_text(entry)
            row["execution_s"] = _execution_s(entry)
            row["metrics"] = report.metrics_of(entry, self.names)
            row["images"] = await self.save_images(server, job, entry)
        if row["submitted_at"] is not None:
            row["wall_s"] = row["finished_at"] - row["submitted_at"]
        if error:
            row.update(status="error", error=error)
        _append_row(self.out / RESULTS_FILE, row)
        self.run.results[job.key] = row
        self.run.state["in_flight"].pop(job.key, None)
        self.save_state()
        if self.run.bar is not None:
            self.run.bar.update(1)

    async def save_images(self, server: Server, job: G.Job, entry: dict) -> list[str]:
        items = [(nid, it) for nid, out in entry.get("outputs", {}).items() for it in out.get("images", [])
                 if isinstance(it, dict) and "filename" in it]
        saved = [(nid, it) for nid, it in items if it.get("type") == "output"] or items[:1]  # else one preview
        paths = []
        for i, (nid, it) in enumerate(saved):
            rel = Path("images") / f"{job.key}_{nid}_{i}{Path(it['filename']).suffix or '.png'}"
            (self.out / rel).write_bytes(await server.view(it))
            paths.append(str(rel))
        return paths

    # -- one job on one server ---------------------------------------------------------------
    async def wait(self, server: Server, pid: str, deadline: float) -> dict:
        """The finished history entry of pid; ServerDown if the server dies or forgets it (restarted)."""
        wake = server.wakeup(pid)
        try:
            while time.time() < deadline:
                if not await server.queued(pid):  # queue first: once out of the queue it is in /history
                    entry = await server.history(pid)
                    if entry is None:
                        raise ServerDown(f"{server.url} no longer knows prompt {pid} (restarted?)")
                    return entry
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL_S)
                wake.clear()
            raise TimeoutError(f"job ran past --job-timeout {self.run.spec.job_timeout_s:.0f}s")
        finally:
            server.forget(pid)

    async def execute(self, server: Server, job: G.Job, pid: str | None) -> None:
        flight = self.run.state["in_flight"]
        if pid is not None:  # in flight when an earlier runner was killed: ask the server before resubmitting
            if await server.queued(pid):
                self.log(f"adopt {job.key} on {server.url}: prompt {pid} still queued")
            else:
                entry = await server.history(pid)
                if entry is not None:
                    self.log(f"adopt {job.key} on {server.url}: prompt {pid} found in /history")
                    return await self.record(server, job, pid, entry, None)
                self.log(f"adopt {job.key} on {server.url}: prompt {pid} unknown to the server, submitting")
                pid = None
        if pid is None:
            pid = str(uuid.uuid4())
            flight[job.key] = {"server": server.url, "prompt_id": pid, "submitted_at": time.time()}
            self.save_state()  # before the POST: a kill right after it still knows the prompt id
            prompt = G.apply(self.run.spec.workflow, self.run.axes, job, self.run.seeds_to)
            await server.submit(prompt, pid, {"zimage_vl_sweep_key": job.key})
            self.log(f"submit {job.key} ({job.label()}) to {server.url} as {pid}")
        started = flight[job.key].get("submitted_at") or time.time()
        entry = await self.wait(server, pid, started + self.run.spec.job_timeout_s)
        await self.record(server, job, pid, entry, None)

    # -- workers ---------------------------------------------------------------------------
    async def until_up(self, server: Server) -> None:
        attempt = 0
        while not self.finished():
            if await server.alive():
                if self.run.down_since.pop(server.url, None) is not None:
                    self.log(f"server {server.url} back", show=True)
                return
            self.run.down_since.setdefault(server.url, time.time())
            if len(self.run.down_since) == len(self.servers) and \
                    time.time() - max(self.run.down_since.values()) > self.run.spec.server_timeout_s:
                raise SweepAborted(f"every server has been down for over {self.run.spec.server_timeout_s:.0f}s; "
                                   f"start them and run again with --resume")
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            attempt += 1

    async def worker(self, server: Server, adopted: list) -> None:
        while not self.finished():
            await self.until_up(server)
            if adopted:
                job, pid = adopted.pop()
            else:
                try:
                    job, pid = await asyncio.wait_for(self.run.queue.get(), 0.5)
                except asyncio.TimeoutError:
                    continue
            if job.key in self.run.results:
                continue
            try:
                await self.execute(server, job, pid)
            except ServerDown as e:
                self.run.state["in_flight"].pop(job.key, None)
                self.save_state()
                self.run.down_since.setdefault(server.url, time.time())
                self.log(f"server {server.url} down ({e}); {job.key} requeued", show=True)
                self.run.queue.put_nowait((job, None))  # another server (or this one, back) runs it
            except (PromptRefused, TimeoutError) as e:
                await self.record(server, job, pid or "", None, str(e))

    async def show_progress(self) -> None:
        while True:
            status = []
            for i, s in enumerate(self.servers):
                if s.url in self.run.down_since:
                    status.append(f"s{i}:down")
                else:
                    steps = next(iter(s.progress.values()), None)
                    status.append(f"s{i}:{steps[0]}/{steps[1]}" if steps else f"s{i}:-")
            self.run.bar.set_postfix_str(" ".join(status), refresh=True)
            await asyncio.sleep(0.5)


async def run_sweep(spec: SweepSpec, resume: bool = False) -> list[dict]:
    """Run (or --resume) a sweep; returns the final rows, one per cell, and writes the CSV, grid and plots."""
    out = Path(spec.out)
    state_path = out / STATE_FILE
    if state_path.exists() and not resume:
        raise G.GridError(f"{out} holds an earlier sweep ({STATE_FILE}): pass --resume to continue it, "
                          "or choose another --out")
    if resume and not state_path.exists():
        raise G.GridError(f"--resume: {state_path} does not exist; run without --resume to start the sweep")
    if not spec.servers:
        raise G.GridError("no server: give at least one --server URL")
    old = json.loads(state_path.read_text(encoding="utf-8")) if resume else {}
    client_id = old.get("client_id") or str(uuid.uuid4())
    async with aiohttp.ClientSession() as session:
        servers = [Server(u, client_id, session) for u in dict.fromkeys(spec.servers)]
        infos = await _object_infos(servers)
        axes = [G.validate_axis(G.parse_axis(t, spec.workflow), spec.workflow, infos) for t in spec.grid]
        if len({a.label for a in axes}) != len(axes) or len({(a.node_id, a.input) for a in axes}) != len(axes):
            raise G.GridError("an input is swept twice: give each NODE.INPUT once")
        seeds_to = G.seed_targets(spec.workflow, spec.seed_inputs) if spec.seeds else []
        jobs = G.expand(axes, spec.seeds)
        signature = _signature(spec.workflow, axes, spec.seeds)
        if resume and old.get("signature") != signature:
            raise G.GridError(f"--resume: {out} holds a different sweep (workflow, grid or seeds changed); "
                              "use the original arguments or another --out")
        out.mkdir(parents=True, exist_ok=True)
        (out / "images").mkdir(exist_ok=True)
        state = {"signature": signature, "client_id": client_id, "in_flight": old.get("in_flight", {}),
                 "axes": [a.label for a in axes], "seeds": spec.seeds}
        run = _Run(spec, axes, jobs, seeds_to, state)
        keys = {j.key for j in jobs}
        run.results = {k: r for k, r in report.read_results(out / RESULTS_FILE).items() if k in keys and r["status"] == "ok"}
        runner = _Runner(run, servers)
        runner.save_state()
        adopted = {s.url: [] for s in servers}
        by_key = {j.key: j for j in jobs}
        for key, flight in list(state["in_flight"].items()):
            if key in run.results or key not in by_key or flight.get("server") not in adopted:
                state["in_flight"].pop(key)
            else:
                adopted[flight["server"]].append((by_key[key], flight["prompt_id"]))
        adopted_keys = {k for k in state["in_flight"]}
        for j in jobs:
            if j.key not in run.results and j.key not in adopted_keys:
                run.queue.put_nowait((j, None))
        tasks = [asyncio.create_task(s.listen()) for s in servers]
        if spec.progress:
            from tqdm import tqdm
            run.bar = tqdm(total=len(jobs), initial=len(run.results), unit="cell", desc="sweep", dynamic_ncols=True)
            tasks.append(asyncio.create_task(runner.show_progress()))
        workers = [asyncio.create_task(runner.worker(s, adopted[s.url])) for s in servers]
        try:
            await asyncio.gather(*workers)
        finally:
            for t in workers + tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if run.bar is not None:
                run.bar.close()
    rows = [run.results[j.key] for j in jobs]
    report.write_all(out, rows, axes, spec.seeds)
    return rows
