"""The sweep's grid: axes parsed from `NODE.INPUT=v1,v2,...` (NODE = node id or `_meta.title`), checked against
every server's /object_info before anything runs, and expanded into jobs with stable keys."""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass

# Nodes whose `seed` / `noise_seed` input --seeds sets when no --seed-input is given.
SAMPLER_CLASSES = frozenset({"KSampler", "KSamplerAdvanced", "RandomNoise", "SamplerCustom"})
SEED_INPUTS = ("seed", "noise_seed")


class GridError(ValueError):
    """A grid, seed or workflow the sweep refuses before submitting anything."""


@dataclass(frozen=True)
class Axis:
    label: str          # as the user wrote the target, e.g. "9.alpha" or "Embedding Blend.alpha"
    node_id: str
    input: str
    values: tuple       # typed (int / float / bool / str) once validated
    raw: tuple = ()     # the strings as written


@dataclass(frozen=True)
class Job:
    key: str
    params: tuple       # ((axis label, value), ...) in axis order
    seed: int | None

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.params] + ([f"seed={self.seed}"] if self.seed is not None else [])
        return ", ".join(parts) or "workflow as is"


def resolve_node(workflow: dict, ref: str) -> str:
    """A node id from an id or a unique `_meta.title`."""
    if ref in workflow:
        return ref
    matches = [nid for nid, n in workflow.items() if (n.get("_meta") or {}).get("title") == ref]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise GridError(f"node title {ref!r} is used by nodes {', '.join(matches)}: use the node id instead")
    titles = sorted({(n.get("_meta") or {}).get("title", "") for n in workflow.values()} - {""})
    raise GridError(f"no node with id or title {ref!r} in the workflow; ids: {', '.join(sorted(workflow))}; "
                    f"titles: {', '.join(repr(t) for t in titles)}")


def parse_axis(text: str, workflow: dict) -> Axis:
    """`9.alpha=0,0.3,0.5` or `"Embedding Blend".alpha=0,0.3` → Axis (values still strings)."""
    target, sep, values = text.partition("=")
    node_ref, dot, name = target.strip().rpartition(".")
    if not sep or not dot or not node_ref or not name:
        raise GridError(f"grid axis {text!r} is not NODE.INPUT=v1,v2,... (NODE: node id or title)")
    node_ref = node_ref.strip().strip("\"'")
    raw = tuple(v.strip() for v in values.split(","))
    if not values.strip() or any(v == "" for v in raw):
        raise GridError(f"grid axis {text!r} has an empty value: write the values comma-separated")
    return Axis(label=f"{node_ref}.{name}", node_id=resolve_node(workflow, node_ref), input=name, values=raw, raw=raw)


def _input_spec(info: dict, name: str):
    for section in ("required", "optional"):
        spec = (info.get("input", {}).get(section) or {}).get(name)
        if spec is not None:
            return spec
    return None


def _widget_names(info: dict) -> list[str]:
    names = []
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"):
                names.append(name)
    return names


def _typed(axis: Axis, raw: str, spec, server: str):
    kind = "COMBO" if isinstance(spec[0], list) else spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    where = f"{axis.label} (node {axis.node_id})"
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        if raw not in [str(c) for c in choices]:
            raise GridError(f"{where}: {raw!r} is not a choice on {server}; choices: "
                            + ", ".join(repr(str(c)) for c in choices[:40]))
        return next(c for c in choices if str(c) == raw)
    if kind == "BOOLEAN":
        if raw.lower() not in ("true", "false"):
            raise GridError(f"{where}: {raw!r} is not a boolean; write true or false")
        return raw.lower() == "true"
    if kind == "STRING":
        return raw
    try:
        value = int(raw) if kind == "INT" else float(raw)
    except ValueError:
        raise GridError(f"{where}: {raw!r} is not {'an integer' if kind == 'INT' else 'a number'}") from None
    lo, hi = opts.get("min"), opts.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise GridError(f"{where}: {raw} is outside {lo}..{hi} on {server}")
    return value


def validate_axis(axis: Axis, workflow: dict, object_infos: dict[str, dict]) -> Axis:
    """Axis with typed values, checked against the workflow and each server's /object_info (GridError if not)."""
    node = workflow[axis.node_id]
    class_type = node.get("class_type")
    current = (node.get("inputs") or {}).get(axis.input)
    if isinstance(current, list):
        raise GridError(f"{axis.label}: input {axis.input!r} of node {axis.node_id} ({class_type}) is a link from "
                        f"node {current[0]}, not a value; sweep a widget input")
    typed = None
    for server, info in object_infos.items():
        if class_type not in info:
            raise GridError(f"{axis.label}: node type {class_type!r} is not installed on {server}")
        spec = _input_spec(info[class_type], axis.input)
        if spec is None:
            raise GridError(f"{axis.label}: {class_type} has no input {axis.input!r}; its value inputs: "
                            + ", ".join(_widget_names(info[class_type])))
        if not (isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")):
            raise GridError(f"{axis.label}: input {axis.input!r} takes a {spec[0]} link, not a value")
        typed = tuple(_typed(axis, raw, spec, server) for raw in axis.raw)
    if len(set(map(repr, typed))) != len(typed):
        raise GridError(f"{axis.label}: a value is listed twice ({', '.join(axis.raw)})")
    return Axis(axis.label, axis.node_id, axis.input, typed, axis.raw)


def seed_targets(workflow: dict, explicit: list[str] | None) -> list[tuple[str, str]]:
    """(node id, input) pairs that receive the seed: --seed-input NODE.INPUT, else the samplers' seed inputs."""
    if explicit:
        out = []
        for text in explicit:
            node_ref, dot, name = text.rpartition(".")
            if not dot:
                raise GridError(f"--seed-input {text!r} is not NODE.INPUT")
            nid = resolve_node(workflow, node_ref.strip("\"'"))
            if name not in (workflow[nid].get("inputs") or {}):
                raise GridError(f"--seed-input {text!r}: node {nid} has no input {name!r}")
            out.append((nid, name))
        return out
    out = [(nid, name) for nid, n in workflow.items() if n.get("class_type") in SAMPLER_CLASSES
           for name in SEED_INPUTS if name in (n.get("inputs") or {}) and not isinstance(n["inputs"][name], list)]
    if not out:
        raise GridError("--seeds given but the workflow has no KSampler/RandomNoise seed: name it with --seed-input")
    return out


def job_key(params: tuple, seed: int | None) -> str:
    """Stable key of one cell: sha1 of its (axis, value) pairs and seed (same cell → same key on resume)."""
    blob = json.dumps([[k, v] for k, v in params] + [["seed", seed]], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def expand(axes: list[Axis], seeds: list[int] | None) -> list[Job]:
    """Every combination of axis values × seeds, first axis varying slowest."""
    value_lists = [[(a.label, v) for v in a.values] for a in axes]
    jobs = []
    for combo in itertools.product(*value_lists, *([[(None, s) for s in seeds]] if seeds else [])):
        params = tuple(p for p in combo if p[0] is not None)
        seed = next((s for k, s in combo if k is None), None)
        jobs.append(Job(job_key(params, seed), params, seed))
    return jobs


def apply(workflow: dict, axes: list[Axis], job: Job, seeds_to: list[tuple[str, str]]) -> dict:
    """The API prompt of one job: the workflow with the job's values and seed written in."""
    prompt = copy.deepcopy(workflow)
    by_label = {a.label: a for a in axes}
    for label, value in job.params:
        axis = by_label[label]
        prompt[axis.node_id]["inputs"][axis.input] = value
    if job.seed is not None:
        for nid, name in seeds_to:
            prompt[nid]["inputs"][name] = job.seed
    return prompt
