"""Users find nodes by the names they already know: the pack's main nodes carry search aliases in the host's
/object_info (what the editor's node search reads), and each familiar search word leads to the right nodes."""
from __future__ import annotations

from tools.host_harness import PACK_LINK_NAME

PACK_MODULE = "custom_nodes." + PACK_LINK_NAME

# search word -> pack nodes that must answer it (others may too)
EXPECTED = {
    "ipadapter": {"ZImageVL_Encode", "ZImageVL_EmbeddingBlend", "ZImageVL_DiTInjection", "ZImageVL_CombineReferences"},
    "ip-adapter": {"ZImageVL_Encode", "ZImageVL_EmbeddingBlend", "ZImageVL_DiTInjection"},
    "redux": {"ZImageVL_Encode", "ZImageVL_EmbeddingBlend", "ZImageVL_DiTInjection"},
    "image prompt": {"ZImageVL_Encode", "ZImageVL_EmbeddingBlend", "ZImageVL_DiTInjection"},
    "style transfer": {"ZImageVL_EmbeddingBlend", "ZImageVL_StyleDelta", "ZImageVL_AdaIN", "ZImageVL_DiTInjection",
                       "ZImageVL_GramMatch", "ZImageVL_SteeringDirection", "ZImageVL_ApplyDirection"},
    "reference": {"ZImageVL_Encode", "ZImageVL_EmbeddingBlend", "ZImageVL_StyleDelta", "ZImageVL_AdaIN",
                  "ZImageVL_DiTInjection", "ZImageVL_CombineReferences", "ZImageVL_SteeringDirection",
                  "ZImageVL_ApplyDirection", "ZImageVL_GramMatch"},
    "reference image": {"ZImageVL_Encode", "ZImageVL_EmbeddingBlend", "ZImageVL_DiTInjection",
                        "ZImageVL_CombineReferences"},
    "clip score": {"ZImageVL_SemanticSimilarity"},
    "similarity": {"ZImageVL_ColourSimilarity", "ZImageVL_SemanticSimilarity"},
    "artifact": {"ZImageVL_ArtifactScore"},
}
MAIN_NODES = set().union(*EXPECTED.values())


def pack_aliases(server) -> dict[str, list[str]]:
    info = server.object_info()
    return {k: v.get("search_aliases") or [] for k, v in info.items()
            if v.get("python_module", "").split(".")[:2] == PACK_MODULE.split(".")}


def test_main_nodes_carry_search_aliases_in_object_info(comfy_server):
    aliases = pack_aliases(comfy_server)
    missing = sorted(MAIN_NODES - set(aliases))
    assert not missing, f"main nodes not registered: {missing}"
    bare = sorted(n for n in MAIN_NODES if not aliases[n])
    assert not bare, f"main nodes without search_aliases in /object_info: {bare}"
    for node_id in MAIN_NODES:
        names = aliases[node_id]
        assert all(isinstance(a, str) and a.strip() == a and a for a in names), (node_id, names)
        assert len({a.lower() for a in names}) == len(names), f"{node_id}: duplicate aliases {names}"


def test_each_familiar_search_word_finds_the_right_pack_nodes(comfy_server):
    aliases = pack_aliases(comfy_server)
    problems = []
    for word, wanted in EXPECTED.items():
        found = {n for n, names in aliases.items() if word in (a.lower() for a in names)}
        if not found:
            problems.append(f"searching {word!r} finds no pack node")
        elif not wanted <= found:
            problems.append(f"searching {word!r} misses {sorted(wanted - found)} (finds {sorted(found)})")
    assert not problems, "\n".join(problems)


def test_metric_aliases_do_not_point_at_the_conditioning_nodes(comfy_server):
    """'clip score' / 'artifact' are measuring words: a user searching them wants a metric node, not a
    conditioning node that happens to mention CLIP."""
    aliases = pack_aliases(comfy_server)
    info = comfy_server.object_info()
    for word in ("clip score", "artifact"):
        for node_id, names in aliases.items():
            if word in (a.lower() for a in names):
                assert info[node_id]["category"].endswith("/metrics"), (word, node_id)
