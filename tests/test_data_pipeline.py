"""Records, mixtures (weights, DeltaLoss drop lists), bad-record accounting, global shuffle + per-process
sharding, and exact restore of the packed iterator state."""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest

from nvila_jax.data import synthetic
from nvila_jax.data.mixture import MixtureError, load_mixture, mixture_weights
from nvila_jax.data.packing import PackingOptions
from nvila_jax.data.pipeline import build_pipeline, mixture_dataset
from nvila_jax.data.records import RecordError, parse_record
from nvila_jax.data.sample import SKIP_REASONS, SampleBuilder, SampleOptions, Skipped
from nvila_jax.variants import tiny

CFG = tiny(s2_scales=(56, 112), max_tiles=6,
           projector=tiny().projector.__class__("mlp_downsample", 64, tiny().llm.hidden_size))
PACK = PackingOptions(rows=2, seq_len=256, tile_buckets=(16, 32), accumulation=1, group_steps=2, pad_id=384)
OPTS = SampleOptions(max_length=256, max_tiles=32)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return synthetic.write_dataset(str(tmp_path_factory.mktemp("shapes")), 40, seed=3)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def qa(image=None, q="What color is the circle?", a="red"):
    r = {"conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}
    if image:
        r["image"] = image
    return r


# ------------------------------------------------------------------------------------------ records
def test_parse_record_fields_and_errors():
    r = parse_record({"id": 7, "images": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "x"}]})
    assert r.images == ("a.png", "b.png") and r.id == "7" and r.video is None
    assert parse_record({"image": "a.png", "conversations": [{"from": "gpt", "value": "y"}]}).images == ("a.png",)
    assert parse_record({"video": ["v.mp4"], "conversations": [{"from": "gpt", "value": "y"}]}).video == "v.mp4"
    for bad, field in (([], "JSON object"), ({"conversations": []}, "conversations"),
                       ({"conversations": [{"from": "human"}]}, r"conversations\[0\]"),
                       ({"image": 3, "conversations": [{"from": "gpt", "value": "y"}]}, "'image'"),
                       ({"video": ["a", "b"], "conversations": [{"from": "gpt", "value": "y"}]}, "'video'")):
        with pytest.raises(RecordError, match=field):
            parse_record(bad)


def test_bad_records_are_skipped_and_counted(tmp_path):
    img = tmp_path / "ok.png"
    PIL.Image.new("RGB", (80, 60), "red").save(img)
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    records = [qa("ok.png"), qa("missing.png"), qa("corrupt.png"), "{not json", {"conversations": []},
               {"conversations": [{"from": "human", "value": "hi"}]},  # nothing to train
               {"conversations": [{"from": "narrator", "value": "hi"}, {"from": "gpt", "value": "x"}]},
               qa("ok.png", q="word " * 400), qa("ok.png", a="blue")]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    mix = load_mixture([{"name": "d", "path": path}])
    builder = SampleBuilder(CFG, "tiny", mix.datasets, OPTS)
    src = mixture_dataset(mix, seed=0, shuffle=False, repeat=False)
    out = [builder(src[i]) for i in range(len(records))]
    reasons = [o.reason if isinstance(o, Skipped) else "ok" for o in out]
    assert reasons == ["ok", "missing_media", "corrupt_media", "invalid_record", "empty_conversation",
                       "no_supervised_tokens", "invalid_record", "too_long", "ok"]
    assert "missing.png" in out[1].detail and "line 4" in out[3].detail
    # Through the packer the skips are counted, never raised.
    ds = build_pipeline(mix, CFG, "tiny", OPTS, PACK, seed=0, shuffle=False, repeat=False)
    steps = list(ds)
    assert sum(s.num_samples for s in steps) == 2
    counts = sum(s.skipped for s in steps)
    assert dict(zip(SKIP_REASONS, counts.tolist())) == {
        "invalid_record": 2, "empty_conversation": 1, "missing_media": 1, "corrupt_media": 1, "too_long": 1,
        "too_many_tiles": 0, "no_supervised_tokens": 1}


def test_json_list_files_and_dataset_errors(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([qa(None, a="x"), qa(None, a="y")]))
    mix = load_mixture([{"name": "d", "path": str(path)}])
    assert len(mixture_dataset(mix, 0, shuffle=False, repeat=False)) == 2
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MixtureError, match="bad.json: not valid JSON"):
        mixture_dataset(load_mixture([{"name": "b", "path": str(tmp_path / "bad.json")}]), 0)
    with pytest.raises(MixtureError, match="nope.json: dataset file not found"):
        mixture_dataset(load_mixture([{"name": "b", "path": str(tmp_path / "nope.json")}]), 0)


# ------------------------------------------------------------------------------------------ mixtures
def test_mixture_yaml_weights_and_drop_lists(tmp_path):
    for name, n in (("a", 100), ("b", 300)):  # grain's index shuffle is slow for very small datasets
        write_jsonl(tmp_path / f"{name}.jsonl", [qa(None, a=f"{name}{i}") for i in range(n)])
    os.makedirs(tmp_path / "drops" / "0.5")
    (tmp_path / "drops" / "0.5" / "b.json").write_text(json.dumps(list(range(0, 300, 2))))
    (tmp_path / "mix.yaml").write_text(
        "slice_folder: drops\ndatasets:\n  - {name: a, path: a.jsonl, weight: 1.0}\n"
        "  - {name: b@0.5, path: b.jsonl, weight: 3.0, no_system_prompt: true}\n")
    mix = load_mixture(str(tmp_path / "mix.yaml"))
    a, b = mix.datasets
    assert (b.name, b.fraction, b.no_system_prompt) == ("b", "0.5", True)
    assert b.path == str(tmp_path / "b.jsonl") and mix.slice_folder == str(tmp_path / "drops")
    ds = mixture_dataset(mix, seed=1)
    first = [ds[i] for i in range(2000)]
    from_b = [e.index for e in first if e.dataset == 1]
    assert set(from_b) == set(range(1, 300, 2))  # the drop list is gone, the rest is drawn
    assert abs(len(from_b) / len(first) - 0.75) < 0.03  # weights are sampling proportions
    assert mixture_weights(load_mixture([{"name": "x", "path": "x"}, {"name": "y", "path": "y"}]), [2, 6]) == [2, 6]


def test_mixture_errors(tmp_path):
    with pytest.raises(MixtureError, match="entry 0: 'path'"):
        load_mixture([{"name": "a"}])
    with pytest.raises(MixtureError, match="unknown keys \\['wieght'\\]"):
        load_mixture([{"name": "a", "path": "a", "wieght": 2}])
    with pytest.raises(MixtureError, match="weight"):
        load_mixture([{"name": "a", "path": "a", "weight": -1}])
    with pytest.raises(MixtureError, match="unique"):
        load_mixture([{"name": "a", "path": "a"}, {"name": "a@0.5", "path": "b"}])
    write_jsonl(tmp_path / "a.jsonl", [qa(None)])
    with pytest.raises(MixtureError, match="drop list .*0.5/a.json not found"):
        mixture_dataset(load_mixture({"slice_folder": str(tmp_path), "datasets": [
            {"name": "a@0.5", "path": str(tmp_path / "a.jsonl")}]}), 0)
    with pytest.raises(MixtureError, match="either every dataset has a weight"):
        mixture_weights(load_mixture([{"name": "x", "path": "x", "weight": 1}, {"name": "y", "path": "y"}]), [1, 1])


# ------------------------------------------------------------------------------------------ order
def stream(path, seed, process_index=0, process_count=1, n=60):
    ds = mixture_dataset(load_mixture([{"name": "s", "path": path}]), seed)[process_index::process_count]
    return [(e.dataset, e.index) for e in (ds[i] for i in range(n))]


def test_global_shuffle_and_process_sharding(shapes):
    full = stream(shapes, seed=5, n=120)
    assert stream(shapes, seed=5, n=120) == full  # same seed, same order on every host
    assert stream(shapes, seed=6, n=120) != full
    assert sorted(i for _, i in full[:40]) == list(range(40))  # an epoch is a permutation
    assert [i for _, i in full[:40]] != [i for _, i in full[40:80]]  # reshuffled every epoch
    shards = [stream(shapes, 5, p, 3, n=40) for p in range(3)]
    assert [x for trio in zip(*shards) for x in trio] == full  # interleaved shards = the global order


def test_packed_iterator_state_restores_exactly(shapes):
    mix = load_mixture([{"name": "s", "path": shapes}])
    ds = build_pipeline(mix, CFG, "tiny", OPTS, PACK, seed=0)
    it = iter(ds)
    for k in range(3):  # stop inside a packing group and at its end
        next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(3)]
        again = iter(ds)
        again.set_state(json.loads(json.dumps(state)))  # states survive a JSON round trip (checkpoint files)
        for want, got in zip(expected, (next(again) for _ in range(3))):
            np.testing.assert_array_equal(want.sources, got.sources)
            for key in want.arrays:
                np.testing.assert_array_equal(want.arrays[key], got.arrays[key])
        it = again


@pytest.mark.slow
def test_worker_processes_restore_exactly(shapes):
    """With decode + packing in grain worker processes the iterator state (all workers') restores exactly."""
    mix = load_mixture([{"name": "s", "path": shapes}])
    ds = build_pipeline(mix, CFG, "tiny", OPTS, PACK, seed=0, num_workers=2)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    it.close()
    again = iter(ds)
    again.set_state(state)
    for want, got in zip(expected, (next(again) for _ in range(3))):
        np.testing.assert_array_equal(want.sources, got.sources)
        np.testing.assert_array_equal(want.arrays["input_ids"], got.arrays["input_ids"])
    again.close()
