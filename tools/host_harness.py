"""Drive a REAL ComfyUI server on loopback: start it with throw-away folders and this pack (plus the
test-only tiny model nodes) in custom_nodes, submit API workflows, read their outputs, and edit
workflows (swap the real loaders for tiny ones). Used by the host tests and by `./dev demo`.
"""


from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
WORKFLOWS_DIR = REPO_ROOT / "workflows"
API_WORKFLOWS_DIR = WORKFLOWS_DIR / "api"
TINY_NODES_DIR = HERE / "tiny_nodes"
PACK_LINK_NAME = "comfyui-zimage-vl"
TINY_LINK_NAME = "zimage_vl_tiny_nodes"
TINY_HF_FOLDER = "tiny-qwen3vl"
BOOT_TIMEOUT_S = float(os.environ.get("ZIMAGE_VL_HOST_BOOT_TIMEOUT", "180"))
PROMPT_TIMEOUT_S = float(os.environ.get("ZIMAGE_VL_HOST_PROMPT_TIMEOUT", "240"))


# --------------------------------------------------------------------------- paths

def comfyui_path() -> Path | None:
    """The ComfyUI checkout to run, or None when there is none."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser()
        return p if (p / "main.py").is_file() else None
    p = Path.home() / "ComfyUI"
    return p if (p / "main.py").is_file() else None


def _host_skip_reason() -> str | None:
    env = os.environ.get("COMFYUI_PATH")
    if env and comfyui_path() is None:
        return f"COMFYUI_PATH={env!r} has no main.py: host tests SKIPPED (nothing was run against a real ComfyUI)"
    if comfyui_path() is None:
        return ("COMFYUI_PATH not set and $HOME/ComfyUI missing: host tests SKIPPED "
                "(nothing was run against a real ComfyUI; set COMFYUI_PATH to run them)")
    return None


HOST_SKIP_REASON = _host_skip_reason()


def shared_dir() -> Path:
    return REPO_ROOT.parent / "shared"


def ref_images_dir() -> Path:
    return shared_dir() / "ref_images"


def ref_image_path(name: str = "test_scene.png", fallback_dir: Path | None = None) -> Path:
    """A reference image from ../shared/ref_images (relative to the repo).

    Outside this workspace (a plain clone has no ../shared) a deterministic synthetic picture of the
    same name is written to ``fallback_dir`` (default: a temp folder) so demos and tests still run.
    """
    p = ref_images_dir() / name
    if p.is_file():
        return p
    import tempfile

    folder = Path(fallback_dir or tempfile.mkdtemp(prefix="zimage_vl_ref_"))
    return synthetic_reference(folder / name)


def synthetic_reference(path: Path, size: int = 512) -> Path:
    """A colourful test picture (gradient sky, sun, hills, a house) saved as PNG at ``path``."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        t = y / size
        draw.line([(0, y), (size, y)], fill=(int(90 + 120 * t), int(150 + 60 * t), int(235 - 80 * t)))
    s = size / 512
    draw.ellipse([380 * s, 50 * s, 460 * s, 130 * s], fill=(255, 215, 70))
    draw.polygon([(0, 380 * s), (170 * s, 250 * s), (360 * s, 390 * s), (512 * s, 300 * s), (512 * s, 512 * s),
                  (0, 512 * s)], fill=(70, 150, 80))
    draw.rectangle([150 * s, 300 * s, 270 * s, 410 * s], fill=(200, 70, 60))
    draw.polygon([(140 * s, 300 * s), (210 * s, 240 * s), (280 * s, 300 * s)], fill=(110, 60, 40))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def load_api_workflow(name: str) -> dict:
    name = name if name.endswith(".json") else name + ".json"
    with open(API_WORKFLOWS_DIR / name, encoding="utf-8") as f:
        return json.load(f)


def load_ui_workflow(name: str) -> dict:
    name = name if name.endswith(".json") else name + ".json"
    with open(WORKFLOWS_DIR / name, encoding="utf-8") as f:
        return json.load(f)


def ui_workflow_names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))


def api_workflow_names() -> list[str]:
    return sorted(p.stem for p in API_WORKFLOWS_DIR.glob("*.json"))


# --------------------------------------------------------------------------- server

class ComfyError(RuntimeError):
    """A prompt the server refused (validation) or that failed while executing."""

    def __init__(self, text: str, *, node_errors=None, error=None, exception_type=None, node_type=None, node_id=None):
        super().__init__(text)
        self.text = text
        self.node_errors = node_errors or {}
        self.error = error or {}
        self.exception_type = exception_type
        self.node_type = node_type
        self.node_id = node_id


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _format_validation_error(body: dict) -> str:
    lines = []
    err = body.get("error") or {}
    if err:
        lines.append(f"{err.get('type', 'error')}: {err.get('message', '')} {err.get('details', '')}".strip())
    for node_id, ne in (body.get("node_errors") or {}).items():
        ctype = ne.get("class_type", "?")
        for e in ne.get("errors", []):
            lines.append(f"node {node_id} ({ctype}): {e.get('message', '')}: {e.get('details', '')}"
                         + (f" {e.get('extra_info')}" if e.get("extra_info") else ""))
    return "\n".join(lines) or json.dumps(body)


class ComfyServer:
    Error = ComfyError  # tests catch ``server.Error`` (the class this module's copy raises)

    def __init__(self, comfy_root: Path, work: Path, *, cpu: bool = True, extra_args=(), launcher=(),
                 extra_custom_nodes: dict | None = None, tiny_hf: bool = True):
        """``cpu=False``, ``extra_args`` (more main.py flags), ``launcher`` (a script run instead of main.py
        that starts it, given main.py's arguments), ``extra_custom_nodes`` ({link name: folder}) and
        ``tiny_hf=False`` are for bench/bench_server.py; the tests use the defaults."""
        self.comfy_root = comfy_root
        self.work = work
        self.cpu, self.extra_args, self.launcher = cpu, list(extra_args), [str(a) for a in launcher]
        self.extra_custom_nodes, self.tiny_hf = dict(extra_custom_nodes or {}), tiny_hf
        self.base = work / "base"
        self.input_dir = self.base / "input"
        self.output_dir = self.base / "output"
        self.user_dir = self.base / "user"
        self.temp_dir = self.base / "temp"
        self.models_dir = self.base / "models"
        self.custom_nodes_dir = self.base / "custom_nodes"
        self.log_path = work / "comfyui_server.log"
        self.port = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._object_info = None
        self.tiny_hf_error: str | None = None

    # -- layout -------------------------------------------------------------
    def prepare(self):
        for d in (self.input_dir, self.output_dir, self.user_dir, self.temp_dir, self.custom_nodes_dir,
                  self.models_dir / "text_encoders", self.models_dir / "diffusion_models",
                  self.models_dir / "vae", self.models_dir / "LLM", self.models_dir / "vl_embeddings"):
            d.mkdir(parents=True, exist_ok=True)
        os.symlink(REPO_ROOT, self.custom_nodes_dir / PACK_LINK_NAME, target_is_directory=True)
        os.symlink(TINY_NODES_DIR, self.custom_nodes_dir / TINY_LINK_NAME, target_is_directory=True)
        for name, folder in self.extra_custom_nodes.items():
            os.symlink(Path(folder).resolve(), self.custom_nodes_dir / name, target_is_directory=True)
        if self.tiny_hf:
            self._make_tiny_hf_folder()
        else:
            self.tiny_hf_error = "not made (tiny_hf=False)"

    def _make_tiny_hf_folder(self):
        """A tiny transformers Qwen3-VL folder under models/text_encoders, made before boot.

        Built in a child interpreter (tools/tiny_models.make_hf_tiny_qwen3vl) so the pytest
        process never imports torch/comfy; a failure only skips the transformers-path test.
        """
        target = self.models_dir / "text_encoders" / TINY_HF_FOLDER
        code = ("import sys, importlib.util\n"
                "sys.path.insert(0, sys.argv[1]); sys.path.append(sys.argv[2])\n"
                "spec = importlib.util.spec_from_file_location('zimage_vl_tests_tiny_models', sys.argv[1] + '/tools/tiny_models.py')\n"
                "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)\n"
                "m.make_hf_tiny_qwen3vl(sys.argv[3], hidden_size=256, seed=0, num_layers=8)\n")
        if not (REPO_ROOT / "tools" / "tiny_models.py").is_file():
            self.tiny_hf_error = "tools/tiny_models.py does not exist yet"
            return
        try:
            r = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT), str(self.comfy_root), str(target)],
                               cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=300,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
            if r.returncode != 0:
                raise RuntimeError(f"exit {r.returncode}: {r.stderr[-3000:]}")
            if not (target / "config.json").is_file():
                raise RuntimeError(f"make_hf_tiny_qwen3vl wrote no config.json in {target}")
        except Exception as e:  # the transformers-path test skips with this text
            self.tiny_hf_error = f"{type(e).__name__}: {e}"
            shutil.rmtree(target, ignore_errors=True)

    # -- process ------------------------------------------------------------
    def start(self):
        self.port = _free_port()
        cmd = [sys.executable, *(self.launcher or ["main.py"]), *(["--cpu"] if self.cpu else []),
               "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base),
               "--input-directory", str(self.input_dir),
               "--output-directory", str(self.output_dir),
               "--temp-directory", str(self.temp_dir),
               "--user-directory", str(self.user_dir),
               "--database-url", f"sqlite:///{self.work / 'comfyui.db'}",
               "--disable-auto-launch", *self.extra_args]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_root), stdout=self._log_file,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} while booting.\n"
                                   f"--- server log tail ---\n{self.log_tail(80)}")
            try:
                self._object_info = self.get_json("/object_info", timeout=10)
                return
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer /object_info within {BOOT_TIMEOUT_S:.0f}s ({last}).\n"
                           f"--- server log tail ---\n{self.log_tail(80)}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- HTTP ---------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _request(self, path, data=None, timeout=30, method=None):
        headers = {"Content-Type": "application/json"} if data is not None else {}
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()

    def get_json(self, path, timeout=30):
        _, raw = self._request(path, timeout=timeout)
        return json.loads(raw)

    def get_bytes(self, path, timeout=30):
        return self._request(path, timeout=timeout)[1]

    def object_info(self, refresh=False) -> dict:
        if refresh or self._object_info is None:
            self._object_info = self.get_json("/object_info", timeout=60)
        return self._object_info

    def post_prompt(self, prompt: dict, extra_data: dict | None = None) -> dict:
        """POST /prompt; raises ComfyError with the server's text when validation fails."""
        payload = {"prompt": prompt, "client_id": "zimage-vl-host-tests"}
        if extra_data:
            payload["extra_data"] = extra_data
        try:
            _, raw = self._request("/prompt", payload, timeout=60)
            body = json.loads(raw)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                body = json.loads(raw)
            except ValueError:
                raise ComfyError(f"/prompt HTTP {e.code}: {raw[:2000]!r}") from None
            raise ComfyError(_format_validation_error(body), node_errors=body.get("node_errors"),
                             error=body.get("error")) from None
        if body.get("node_errors"):
            # the server ran the outputs that validated; a test prompt must validate entirely
            raise ComfyError(_format_validation_error(body), node_errors=body["node_errors"])
        return body

    def wait_history(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error" or not status.get("completed"):
                    raise self._execution_error(entry)
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}.\n{self.log_tail(80)}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f}s")

    @staticmethod
    def _execution_error(entry: dict) -> ComfyError:
        for event, data in entry.get("status", {}).get("messages", []):
            if event == "execution_error":
                text = (f"node {data.get('node_id')} ({data.get('node_type')}) raised "
                        f"{data.get('exception_type')}: {data.get('exception_message')}")
                return ComfyError(text, exception_type=data.get("exception_type"),
                                  node_type=data.get("node_type"), node_id=data.get("node_id"))
            if event == "execution_interrupted":
                return ComfyError(f"execution interrupted: {data}")
        return ComfyError(f"prompt failed: {json.dumps(entry.get('status'))[:2000]}")

    def submit(self, prompt: dict, timeout: float = PROMPT_TIMEOUT_S, extra_data: dict | None = None) -> dict:
        """Queue an API-format prompt and return its /history entry (raises ComfyError)."""
        body = self.post_prompt(prompt, extra_data)
        return self.wait_history(body["prompt_id"], timeout=timeout)

    # -- files ----------------------------------------------------------------
    def view(self, item: dict) -> bytes:
        """The bytes of one reported output file, fetched through GET /view like the editor does."""
        import urllib.parse
        q = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                    "type": item.get("type", "output")})
        return self.get_bytes(f"/view?{q}")

    def output_files(self, entry: dict, node_id: str, kind: str | None = None) -> list[Path]:
        """Paths of the files an output node reported in a history entry."""
        out = entry.get("outputs", {}).get(str(node_id), {})
        paths = []
        for key, items in out.items():
            if kind is not None and key != kind:
                continue
            if not isinstance(items, list):
                continue
            for it in items:
                if isinstance(it, dict) and "filename" in it:
                    # ComfyUI puts its temp folder at <--temp-directory>/temp
                    root = {"output": self.output_dir, "temp": self.temp_dir / "temp", "input": self.input_dir}.get(
                        it.get("type", "output"), self.output_dir)
                    paths.append(root / it.get("subfolder", "") / it["filename"])
        return paths

    def stage_ref_image(self, name: str = "test_scene.png", size: int | None = 128, dest_name: str | None = None) -> str:
        """Copy a reference image into the input dir (optionally resized square) and return its name."""
        src = ref_image_path(name, fallback_dir=self.work / "ref_images")
        dest_name = dest_name or (f"{Path(name).stem}_{size}.png" if size else name)
        dest = self.input_dir / dest_name
        if not dest.exists():
            if size:
                from PIL import Image
                with Image.open(src) as im:
                    im.convert("RGB").resize((size, size), Image.BICUBIC).save(dest)
            else:
                shutil.copyfile(src, dest)
        return dest_name


# --------------------------------------------------------------------------- prompt editing

def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n.get("class_type") == class_type]


def node_of(prompt: dict, class_type: str) -> str:
    ids = nodes_of(prompt, class_type)
    assert len(ids) == 1, f"expected exactly one {class_type} node, found {ids}"
    return ids[0]


def links_to(prompt: dict, node_id: str):
    """(consumer_id, input_name, output_index) for every link that leaves ``node_id``."""
    out = []
    for nid, n in prompt.items():
        for name, v in n.get("inputs", {}).items():
            if isinstance(v, list) and len(v) == 2 and str(v[0]) == str(node_id):
                out.append((nid, name, v[1]))
    return out


def _is_vl_clip_loader(node: dict) -> bool:
    name = str(node.get("inputs", {}).get("clip_name", "")).lower()
    return "vl" in name


def swap_loaders_for_tiny(prompt: dict, *, seed: int = 0, width: int = 256, vl_width: int | None = None,
                          vl_backend: str = "native", vl_folder: str = TINY_HF_FOLDER,
                          vl_layers: str | None = None) -> dict:
    """Return a copy of an API workflow with every real loader replaced by a tiny one; links kept.

    UNETLoader -> TinyZImageModel, VAELoader -> TinyVAE, CLIPLoader (Qwen3-4B) ->
    TinyZImageTextEncoder, CLIPLoader (Qwen3-VL, its file name contains "vl") -> TinyQwen3VLClip.
    ``vl_backend="transformers"`` instead makes the VL side a ZImageVL_LoadQwen3VL on the tiny HF
    folder (re-wiring VL Encode's ``clip`` input to ``vl_model``); ``"native"`` turns a
    ZImageVL_LoadQwen3VL into a TinyQwen3VLClip (re-wiring ``vl_model`` to ``clip``).
    The tiny Qwen3-VL models have 8 decoder layers, so VL Encode keeps the shipped ``layers`` (-6)
    unless ``vl_layers`` is given.
    """
    p = copy.deepcopy(prompt)
    vl_width = width if vl_width is None else vl_width

    def rewire(node_id, old_input, new_input):
        for consumer, name, idx in links_to(p, node_id):
            if name == old_input:
                p[consumer]["inputs"][new_input] = p[consumer]["inputs"].pop(name)

    for nid, node in list(p.items()):
        ct = node.get("class_type")
        meta = node.setdefault("_meta", {})
        if ct == "UNETLoader":
            p[nid] = {"class_type": "TinyZImageModel", "inputs": {"seed": seed, "cap_feat_dim": width},
                      "_meta": {"title": "tiny " + meta.get("title", ct)}}
        elif ct == "VAELoader":
            p[nid] = {"class_type": "TinyVAE", "inputs": {"seed": seed}, "_meta": {"title": "tiny VAE"}}
        elif ct == "CLIPLoader" and not _is_vl_clip_loader(node):
            p[nid] = {"class_type": "TinyZImageTextEncoder", "inputs": {"seed": seed, "hidden_size": width},
                      "_meta": {"title": "tiny Qwen3-4B"}}
        elif (ct == "CLIPLoader" and _is_vl_clip_loader(node)) or ct == "ZImageVL_LoadQwen3VL":
            if vl_backend == "native":
                p[nid] = {"class_type": "TinyQwen3VLClip", "inputs": {"seed": seed, "hidden_size": vl_width},
                          "_meta": {"title": "tiny Qwen3-VL (native)"}}
                rewire(nid, "vl_model", "clip")
            elif vl_backend == "transformers":
                p[nid] = {"class_type": "ZImageVL_LoadQwen3VL", "inputs": {"folder": vl_folder, "dtype": "fp32"},
                          "_meta": {"title": "tiny Qwen3-VL (transformers)"}}
                rewire(nid, "clip", "vl_model")
            else:
                raise ValueError(f"unknown vl_backend {vl_backend!r}")
    if vl_layers is not None:
        for nid in nodes_of(p, "ZImageVL_Encode"):
            p[nid]["inputs"]["layers"] = vl_layers
    return p


def set_inputs(prompt: dict, class_type: str, **values) -> dict:
    ids = nodes_of(prompt, class_type)
    assert ids, f"no {class_type} node in the prompt"
    for nid in ids:
        prompt[nid]["inputs"].update(values)
    return prompt


def set_image(prompt: dict, filename: str) -> dict:
    return set_inputs(prompt, "LoadImage", image=filename)


def new_node_id(prompt: dict) -> str:
    ids = [int(k) for k in prompt if str(k).isdigit()]
    return str(max(ids, default=0) + 1)


def add_node(prompt: dict, class_type: str, inputs: dict, title: str | None = None) -> str:
    nid = new_node_id(prompt)
    prompt[nid] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title or class_type}}
    return nid


def prune_to(prompt: dict, keep_outputs: list[str]) -> dict:
    """Drop every node that no node in ``keep_outputs`` depends on."""
    needed, stack = set(), [str(k) for k in keep_outputs]
    while stack:
        nid = stack.pop()
        if nid in needed:
            continue
        needed.add(nid)
        for v in prompt[nid].get("inputs", {}).values():
            if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt:
                stack.append(str(v[0]))
    return {k: v for k, v in prompt.items() if k in needed}
