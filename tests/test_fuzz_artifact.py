"""Fuzzed artifacts: whatever is wrong with one, the runtime answers with a typed error or the
right output, never a traceback and never "exact" beside tokens that are not full's.

Property-based (hypothesis, derandomized, fixed example counts): mutations of manifest.json and
profile.json (a random node replaced by random JSON, keys deleted or renamed, huge, negative or
non-finite numbers, wrong types) and flipped bytes in random files at random offsets, each on a
fresh copy of one tiny model exported once for the module.
"""

from __future__ import annotations

import collections
import gc
import itertools
import json
import math
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from swapmoe_edge.core.errors import SwapMoEError  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402

from tiny import save_tiny, words  # noqa: E402

ROWS = [[5, 9, 13, 17, 21, 25, 1], [40, 33, 26, 19, 1]]
NEW_TOKENS = 6
RUN = dict(threads=1, max_source_tokens=16)  # a short warm-up pass: each case loads a runtime
# Manifest fields whose other valid values are another model, not a damaged one: the output may
# change with them (the manifest carries no checksum of itself to tell the two apart).
SEMANTIC = {("config", "expert_capacity"), ("config", "pad_token_id"), ("config", "eos_token_id"),
            ("config", "decoder_start_token_id"), ("generation",)}
OUTCOMES: collections.Counter = collections.Counter()


def fuzz_settings(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


class World:
    """The intact artifact, full's tokens on it, and fresh copies to damage."""

    def __init__(self, root: Path):
        self.root = root
        ckpt = save_tiny(root / "ckpt", seed=5)  # a seed whose tokens vary, and differ at 25% for prune and swapmoe
        self.original = export_checkpoint(ckpt, root / "art", validate=False, quiet=True)
        with Runtime(self.original, RuntimeConfig(policy="full", **RUN)) as rt:
            self.reference = [r.token_ids for r in rt.generate(ROWS, max_new_tokens=NEW_TOKENS)]
            texts = [words(range(3 + i, 40, 3 + i % 5)) for i in range(12)]
            rt.profile_texts(texts, max_new_tokens=4).save(self.original)
        self.manifest = json.loads((self.original / "manifest.json").read_text())
        self.profile = json.loads((self.original / "profile.json").read_text())
        self.files = sorted(self.manifest["files"]) + ["manifest.json", "profile.json"]
        self._n = itertools.count()

    def fresh(self) -> Path:
        """A copy whose files are hard links to the original's (``write`` replaces one, never edits it)."""
        return Path(shutil.copytree(self.original, self.root / f"case{next(self._n)}", copy_function=os.link))


def write(path: Path, data: bytes) -> None:
    path.unlink()  # break the hard link: the original stays intact
    path.write_bytes(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWAPMOE_CACHE_DIR", str(tmp_path_factory.mktemp("fuzzcache")))
        world = World(tmp_path_factory.mktemp("fuzz"))
        # Each load returns freed heap to the system (memory.trim), whose gc.collect walks every
        # object torch and transformers made: 0.4 s a case. Frozen, they are skipped.
        gc.freeze()
        try:
            yield world
        finally:
            gc.unfreeze()
    print(f"\nfuzz outcomes ({sum(OUTCOMES.values())} cases): {dict(OUTCOMES)}")


def run(world: World, art: Path, policy: str, budget: str, same_model: bool) -> None:
    """Load and generate; a typed error is fine, anything else fails the test. An exact result must
    carry full's tokens; ``same_model``: a full run must too (it may not give other tokens)."""
    try:
        try:
            with Runtime(art, RuntimeConfig(policy=policy, budget=budget, **RUN)) as rt:
                results = rt.generate(ROWS, max_new_tokens=NEW_TOKENS)
        except SwapMoEError:
            OUTCOMES[f"{policy}: typed error"] += 1
            return
    finally:
        shutil.rmtree(art)
    tokens = [r.token_ids for r in results]
    for r, want in zip(results, world.reference):
        if r.exact and same_model:
            assert r.token_ids == want, f"labelled exact with other tokens than full's: {r.token_ids} != {want}"
    if policy == "full" and same_model:
        assert tokens == world.reference and all(r.exact for r in results)
    OUTCOMES[f"{policy}: ran, {'same' if tokens == world.reference else 'other'} tokens"] += 1


# -- JSON mutations ----------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
EXTREMES = st.sampled_from([-1, 0, 1, 2**31, 2**63, 10**12, -(10**12), 0.5, -0.0, 1e308, -1e308,
                            math.inf, -math.inf, math.nan])


def paths(node, at=()):
    """Every node's path in a JSON tree (keys and list indices), the root's () first."""
    yield at
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from paths(v, at + (k,))


def get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


@st.composite
def json_edit(draw, tree):
    """(the paths it changed, the new tree) after one mutation of ``tree`` (a deep copy is edited)."""
    tree = json.loads(json.dumps(tree))
    every = list(paths(tree))
    shallow = [p for p in every if len(p) <= 2]
    path = draw(st.sampled_from(every) | st.sampled_from(shallow))
    op = draw(st.sampled_from(["replace", "extreme", "retype", "delete", "rename", "duplicate", "swap"]))
    old = get(tree, path)
    if op == "swap":  # two values of one type trade places: plausible references to the wrong thing
        same = [p for p in every if p and p[:len(path)] != path and path[:len(p)] != p  # neither holds the other
                and type(get(tree, p)) is type(old) and get(tree, p) != old]
        if same and path:
            other = draw(st.sampled_from(same))
            value = get(tree, other)
            get(tree, other[:-1])[other[-1]] = old
            get(tree, path[:-1])[path[-1]] = value
            return [path, other], tree
        op = "replace"
    if op == "replace" or not path and op != "retype":
        new = draw(JSON)
    elif op == "extreme":
        new = draw(EXTREMES)
    elif op == "retype":
        new = draw(st.sampled_from([str(old)[:20], [old], {"value": old}, None, True, isinstance(old, str) and 7]))
    else:
        parent, key = get(tree, path[:-1]), path[-1]
        if op == "delete":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = parent.pop(key)
        elif isinstance(parent, list):
            parent.insert(key, json.loads(json.dumps(old)))
        return [path], tree
    if not path:
        return [path], new
    get(tree, path[:-1])[path[-1]] = new
    return [path], tree


def semantic(paths_edited) -> bool:
    return any(p[:2] in SEMANTIC or p[:1] in SEMANTIC for p in paths_edited)


@fuzz_settings(400)
@given(data=st.data(), policy=st.sampled_from(["full", "full", "swapmoe", "on-demand"]))
def test_a_mutated_manifest_is_a_typed_error_or_the_right_output(world, data, policy):
    tree, edited = world.manifest, []
    for _ in range(data.draw(st.integers(1, 3))):
        changed, tree = data.draw(json_edit(tree))
        edited += changed
    art = world.fresh()
    write(art / "manifest.json", json.dumps(tree).encode())
    run(world, art, policy, "100%" if policy == "full" else "25%", same_model=not semantic(edited))


@fuzz_settings(160)
@given(data=st.data(), policy=st.sampled_from(["swapmoe", "prune", "ladder", "on-demand"]))
def test_a_mutated_profile_is_a_typed_error_or_an_honest_output(world, data, policy):
    tree = world.profile
    for _ in range(data.draw(st.integers(1, 3))):
        tree = data.draw(json_edit(tree))[1]
    art = world.fresh()
    write(art / "profile.json", json.dumps(tree).encode())
    run(world, art, policy, "25%", same_model=True)  # the profile only steers residency: "exact" still means full's tokens


@st.composite
def byte_edits(draw, world: World):
    rel = draw(st.sampled_from(world.files))
    size = (world.original / rel).stat().st_size
    flips = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)), min_size=1, max_size=3))
    cut = draw(st.sampled_from([None] * 6 + [0, size // 2, size - 1]))
    return rel, flips, cut


@fuzz_settings(320)
@given(data=st.data(), policy=st.sampled_from(["full", "swapmoe", "prune", "on-demand", "ladder"]))
def test_flipped_bytes_are_a_typed_error_or_the_right_output(world, data, policy):
    art = world.fresh()
    for _ in range(data.draw(st.integers(1, 2))):
        rel, flips, cut = data.draw(byte_edits(world))
        buf = bytearray((art / rel).read_bytes())
        for offset, mask in flips if buf else ():
            buf[offset % len(buf)] ^= mask
        write(art / rel, bytes(buf[:cut] if cut is not None else buf))
    # The manifest is not hashed (nothing to hash it against): a flip that leaves it valid JSON
    # may change a semantic field; the other files are all checked.
    run(world, art, policy, "100%" if policy in ("full", "swapmoe") else "25%", same_model=rel != "manifest.json")
