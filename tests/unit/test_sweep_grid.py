"""tools.sweep.grid: axes parsed by node id or title, refused before anything runs, expanded into stable jobs."""
import pytest

from tools.sweep import grid as G

WORKFLOW = {
    "3": {"class_type": "KSampler", "_meta": {"title": "KSampler"},
          "inputs": {"seed": 1, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "model": ["1", 0]}},
    "9": {"class_type": "ZImageVL_EmbeddingBlend", "_meta": {"title": "Embedding Blend"},
          "inputs": {"alpha": 0.3, "mode": "linear", "conditioning": ["4", 0]}},
    "10": {"class_type": "Note", "_meta": {"title": "twin"}, "inputs": {}},
    "11": {"class_type": "Note", "_meta": {"title": "twin"}, "inputs": {}},
    "12": {"class_type": "TinyZImageModel", "_meta": {"title": "tiny"}, "inputs": {"seed": 0}},
}
# /object_info in both of ComfyUI's combo spellings (V1 list, V3 "COMBO" + options)
INFO = {
    "KSampler": {"input": {"required": {
        "model": ["MODEL"], "seed": ["INT", {"min": 0, "max": 2**64 - 1}], "steps": ["INT", {"min": 1, "max": 10000}],
        "cfg": ["FLOAT", {"min": 0.0, "max": 100.0}], "sampler_name": [["euler", "ddim"], {}]}}},
    "ZImageVL_EmbeddingBlend": {"input": {"required": {
        "conditioning": ["CONDITIONING"], "alpha": ["FLOAT", {"min": 0.0, "max": 1.0}],
        "mode": ["COMBO", {"options": ["linear", "slerp", "graduated"]}]}}},
    "Note": {"input": {"required": {}}},
    "TinyZImageModel": {"input": {"required": {"seed": ["INT", {"min": 0}]}}},
}
SERVERS = {"http://a": INFO, "http://b": INFO}


def axis(text, infos=SERVERS):
    return G.validate_axis(G.parse_axis(text, WORKFLOW), WORKFLOW, infos)


def test_axes_by_id_and_by_title_are_the_same_input_with_typed_values():
    by_id, by_title = axis("9.alpha=0,0.3,0.5"), axis('"Embedding Blend".alpha=0,0.3,0.5')
    assert (by_id.node_id, by_id.input) == (by_title.node_id, by_title.input) == ("9", "alpha")
    assert by_id.values == (0.0, 0.3, 0.5) and all(isinstance(v, float) for v in by_id.values)
    assert by_title.label == "Embedding Blend.alpha"
    assert axis("KSampler.steps=1,2").values == (1, 2)
    assert axis("3.sampler_name=ddim").values == ("ddim",)
    assert axis("9.mode=slerp,linear").values == ("slerp", "linear")


@pytest.mark.parametrize("text, message", [
    ("42.alpha=0,1", "no node with id or title '42'"),
    ("twin.x=1", "used by nodes 10, 11"),
    ("9.alfa=0,1", "has no input 'alfa'; its value inputs: alpha, mode"),
    ("9.alpha=0,high", "'high' is not a number"),
    ("3.steps=1.5", "'1.5' is not an integer"),
    ("9.alpha=0,2", "outside 0.0..1.0"),
    ("3.sampler_name=euler,heun", "'heun' is not a choice"),
    ("9.mode=linear,cubic", "'cubic' is not a choice"),
    ("9.conditioning=1", "is a link from node 4"),
    ("9.alpha=0,0", "listed twice"),
    ("9.alpha", "NODE.INPUT=v1,v2"),
    ("alpha=1", "NODE.INPUT=v1,v2"),
    ("9.alpha=0,,1", "empty value"),
])
def test_bad_axes_are_refused_with_what_to_fix(text, message):
    with pytest.raises(G.GridError, match=message.replace("(", r"\(").replace(".", r"\.")):
        axis(text)


def test_every_server_is_checked():
    lean = {k: v for k, v in INFO.items() if k != "ZImageVL_EmbeddingBlend"}
    with pytest.raises(G.GridError, match="not installed on http://b"):
        axis("9.alpha=0", {"http://a": INFO, "http://b": lean})
    fewer = {**INFO, "KSampler": {"input": {"required": {**INFO["KSampler"]["input"]["required"],
                                                          "sampler_name": [["euler"], {}]}}}}
    with pytest.raises(G.GridError, match="'ddim' is not a choice on http://b"):
        axis("3.sampler_name=ddim", {"http://a": INFO, "http://b": fewer})


def test_seeds_go_to_samplers_not_to_model_builders():
    assert G.seed_targets(WORKFLOW, None) == [("3", "seed")]
    assert G.seed_targets(WORKFLOW, ["tiny.seed"]) == [("12", "seed")]
    with pytest.raises(G.GridError, match="no KSampler"):
        G.seed_targets({"1": WORKFLOW["12"]}, None)
    with pytest.raises(G.GridError, match="has no input 'noise'"):
        G.seed_targets(WORKFLOW, ["3.noise"])


def test_expand_is_every_cell_once_with_stable_keys():
    axes = [axis("9.alpha=0,0.5,1"), axis("3.cfg=1,2")]
    jobs = G.expand(axes, [7, 8])
    assert len(jobs) == 12 and len({j.key for j in jobs}) == 12
    assert [j.key for j in G.expand(axes, [7, 8])] == [j.key for j in jobs]  # the same on resume
    assert jobs[0].params == (("9.alpha", 0.0), ("3.cfg", 1.0)) and jobs[0].seed == 7
    assert jobs[1].seed == 8 and jobs[-1].params == (("9.alpha", 1.0), ("3.cfg", 2.0))
    assert G.expand([], None)[0].label() == "workflow as is"


def test_apply_writes_values_and_seed_into_a_copy():
    axes = [axis("9.alpha=0.5"), axis("KSampler.sampler_name=ddim")]
    job = G.expand(axes, [42])[0]
    prompt = G.apply(WORKFLOW, axes, job, G.seed_targets(WORKFLOW, None))
    assert prompt["9"]["inputs"]["alpha"] == 0.5 and prompt["3"]["inputs"]["sampler_name"] == "ddim"
    assert prompt["3"]["inputs"]["seed"] == 42 and prompt["12"]["inputs"]["seed"] == 0
    assert WORKFLOW["9"]["inputs"]["alpha"] == 0.3 and WORKFLOW["3"]["inputs"]["seed"] == 1
