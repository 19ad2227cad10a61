"""The Python module against the C++ library: bitwise equal to longheads_run, the same bits in
prefill, decode and any thread count, arrays read in place, errors as Python exceptions with
the cache unchanged. Run by ctest (python_module) with PYTHONPATH at the built module."""
import os
import subprocess
import tempfile

import numpy as np
import pytest

import longheads as lh

HQ, HKV, D = 4, 2, 16  # a GQA shape


def sequence(tokens, seed=0, hq=HQ, hkv=HKV, d=D):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((tokens, hq, d), dtype=np.float32), rng.standard_normal((tokens, hkv, d), dtype=np.float32),
            rng.standard_normal((tokens, hkv, d), dtype=np.float32))


def layer(method="longheads", policy="paper", threads=1, kv_storage="fp32", scorer=None, encoder=None, representation_floats=0,
          **knobs):
    shape = dict(n_q_heads=HQ, n_kv_heads=HKV, head_dim=D, chunk_size=8, budget_chunks=4) | knobs
    config = lh.AttentionConfig(**shape, method=method, kv_storage=kv_storage)
    return lh.Attention(config, lh.Rope(D, 10000.0, "half"), policy=policy, threads=threads, scorer=scorer, encoder=encoder,
                        representation_floats=representation_floats)


@pytest.mark.parametrize("method", ["longheads", "dense", "sink_window"])
def test_bitwise_equal_to_longheads_run(method):
    tool = os.environ.get("LONGHEADS_RUN")
    if not tool:
        pytest.skip("LONGHEADS_RUN (the longheads_run tool) is not set")
    q, k, v = sequence(200, seed=3)
    a = layer(method)
    cache = a.make_cache()
    if method == "longheads":
        out, selections = a.prefill(cache, q, k, v, selections=True)
    else:
        out = a.prefill(cache, q, k, v)
    with tempfile.TemporaryDirectory() as tmp:
        for name, x in (("q", q), ("k", k), ("v", v)):
            np.save(os.path.join(tmp, name + ".npy"), x)
        args = [tool, "--q", f"{tmp}/q.npy", "--k", f"{tmp}/k.npy", "--v", f"{tmp}/v.npy", "--out", f"{tmp}/out.npy",
                "--attention", method.replace("_", "-"), "--chunk-size", "8", "--chunks", "4", "--rope-theta", "10000",
                "--rope-layout", "half"]
        if method == "longheads":
            args += ["--selections", f"{tmp}/sel.npy"]
        subprocess.run(args, check=True, capture_output=True)
        assert np.array_equal(out.view(np.uint32), np.load(f"{tmp}/out.npy").view(np.uint32))
        if method == "longheads":
            assert np.array_equal(selections, np.load(f"{tmp}/sel.npy"))


@pytest.mark.parametrize("policy", lh.policies())
def test_every_policy_prefill_decode_and_threads_agree(policy):
    q, k, v = sequence(150, seed=5)
    reference, reference_sel = layer(policy=policy).prefill(layer(policy=policy).make_cache(), q, k, v, selections=True)
    for threads in (1, 3):
        a = layer(policy=policy, threads=threads)
        cache = a.make_cache(reserve=150)
        out = np.empty_like(reference)
        for t in range(150):
            a.decode(cache, q[t:t + 1], k[t:t + 1], v[t:t + 1], out=out[t:t + 1])
        assert np.array_equal(out.view(np.uint32), reference.view(np.uint32))
        assert cache.tokens == 150
        assert np.array_equal(cache.last_selection(1), reference_sel[-1, 1][reference_sel[-1, 1] >= 0])


def test_arrays_are_read_and_written_in_place():
    q, k, v = sequence(64, seed=7)
    fused = np.concatenate([q.reshape(64, -1), k.reshape(64, -1), v.reshape(64, -1)], axis=1)  # [T, (HQ + 2 HKV) d]
    qf = fused[:, :HQ * D].reshape(64, HQ, D)  # token stride (HQ + 2 HKV) d, heads dense: no copy
    kf = fused[:, HQ * D:(HQ + HKV) * D].reshape(64, HKV, D)
    vf = fused[:, (HQ + HKV) * D:].reshape(64, HKV, D)
    assert not qf.flags.c_contiguous and np.shares_memory(qf, fused)
    a = layer()
    expected = a.prefill(a.make_cache(), q, k, v)
    out = np.zeros_like(expected)
    returned = a.prefill(a.make_cache(), qf, kf, vf, out=out)
    assert returned is out
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))
    with pytest.raises(lh.ShapeError, match="in place"):
        a.prefill(a.make_cache(), q[:, :, ::2], k, v)  # d strided: would need a copy
    with pytest.raises(TypeError, match="float32"):
        a.prefill(a.make_cache(), q.astype(np.float64), k, v)


def test_errors_are_python_exceptions_and_leave_the_cache_unchanged():
    q, k, v = sequence(40, seed=9)
    a = layer()
    cache = a.make_cache()
    a.prefill(cache, q[:20], k[:20], v[:20])
    before = cache.copy()
    bad = q[20:].copy()
    bad[3, 1, 2] = np.nan
    with pytest.raises(lh.ValueError, match="NaN|non-finite"):
        a.prefill(cache, bad, k[20:], v[20:])
    with pytest.raises(lh.ShapeError):
        a.prefill(cache, q[20:], k[20:, :1], v[20:])
    with pytest.raises(lh.ShapeError, match="expected 1"):
        a.decode(cache, q[20:22], k[20:22], v[20:22])
    with pytest.raises(lh.LimitError):
        cache.truncate(41)
    assert cache == before and cache.tokens == 20
    with pytest.raises(lh.ConfigError, match="budget_chunks"):
        layer(budget_chunks=0)
    with pytest.raises(lh.ConfigError, match="unknown policy"):
        layer(policy="no-such-policy")
    assert issubclass(lh.ShapeError, lh.Error) and issubclass(lh.Error, ValueError)


def test_bf16_storage_and_the_cache_report():
    q, k, v = sequence(100, seed=11)
    fp32, bf16 = layer(), layer(kv_storage="bf16")
    c32, c16 = fp32.make_cache(), bf16.make_cache()
    out32, out16 = fp32.prefill(c32, q, k, v), bf16.prefill(c16, q, k, v)
    assert np.abs(out16 - out32).max() <= 3e-2 * np.abs(out32).max()
    assert c16.bytes_by_kind()["keys"] * 2 == c32.bytes_by_kind()["keys"]
    assert bf16.config.kv_storage == "bf16"


def test_int8_storage():
    q, k, v = sequence(100, seed=11)
    # Dense attention: no selection to flip on a near-tie, so every output is close.
    fp32, int8 = layer(method="dense"), layer(method="dense", kv_storage="int8")
    c32, c8 = fp32.make_cache(), int8.make_cache()
    out32, out8 = fp32.prefill(c32, q, k, v), int8.prefill(c8, q, k, v)
    assert np.abs(out8 - out32).max() <= 2e-2 * np.abs(out32).max()
    elements = c32.bytes_by_kind()["keys"] // 4
    assert c8.bytes_by_kind()["keys"] == elements + elements // 16 * 2  # head_dim 16: a bf16 scale per 16
    assert int8.config.kv_storage == "int8"
    again = int8.make_cache()
    assert np.array_equal(int8.prefill(again, q, k, v), out8)
    with pytest.raises(lh.ConfigError):
        layer(kv_storage="int4")


def load_example(name):
    import importlib.util
    source = os.environ.get("LONGHEADS_SOURCE", os.path.join(os.path.dirname(__file__), "..", ".."))
    spec = importlib.util.spec_from_file_location(name, os.path.join(source, "examples", "python", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bound_scorer(rope):
    """bound_scorer in NumPy: examples/python/passkey.py's python_bounds (the query rotated as the
    C++ scorer rotates it, by rope.rotate; sum_i max(q_i lo_i, q_i hi_i) in float64)."""
    return load_example("passkey").python_bounds(rope)


def key_bounds(queries, keys, values):
    return np.concatenate([keys.min(axis=0), keys.max(axis=0)])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_python_bound_scorer_reproduces_the_recommended_selections(seed):
    q, k, v = sequence(600, seed=seed)
    config = lh.AttentionConfig(n_q_heads=HQ, n_kv_heads=HKV, head_dim=D, chunk_size=8, budget_chunks=6)
    rope = lh.Rope(D, 10000.0, "interleaved")
    recommended = lh.Attention(config, rope, policy="recommended")
    expected, expected_sel = recommended.prefill(recommended.make_cache(), q, k, v, selections=True)
    for threads, split in ((1, 600), (2, 1), (1, 37)):
        python = lh.Attention(config, rope, policy="recommended", scorer=bound_scorer(rope), threads=threads)
        cache = python.make_cache()
        sel = np.concatenate([python.prefill(cache, q[t:t + split], k[t:t + split], v[t:t + split], selections=True)[1]
                              for t in range(0, 600, split)])
        assert np.array_equal(sel, expected_sel)
    # The encoder in Python too (min and max are exact): the same chunks again, and the outputs.
    both = lh.Attention(config, rope, scorer=bound_scorer(rope), encoder=key_bounds, representation_floats=2 * D)
    out, sel = both.prefill(both.make_cache(), q, k, v, selections=True)
    assert np.array_equal(sel, expected_sel)
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))


def test_a_failing_python_policy_raises_and_leaves_the_cache_unchanged():
    q, k, v = sequence(120, seed=4)
    calls = []

    def scorer(queries, summaries, first_position, chunk_size):
        calls.append(first_position)
        if first_position >= 100:
            raise RuntimeError("scorer gave up")
        return np.zeros((len(queries), len(summaries)), dtype=np.float32)

    a = layer(scorer=scorer)
    cache = a.make_cache()
    a.prefill(cache, q[:100], k[:100], v[:100])
    before = cache.copy()
    with pytest.raises(lh.PolicyError, match="scorer raised .*gave up") as raised:
        a.prefill(cache, q[100:], k[100:], v[100:])
    assert isinstance(raised.value.__cause__, RuntimeError)  # the policy's own exception
    assert cache == before and cache.tokens == 100
    with pytest.raises(lh.ConfigError, match="needs a Python scorer"):
        layer(encoder=key_bounds, representation_floats=2 * D)
    assert calls


def zeros_scorer(queries, summaries, first_position, chunk_size):
    return np.zeros((len(queries), len(summaries)), dtype=np.float32)


@pytest.mark.parametrize("policy, error, message", [
    (dict(scorer=lambda qs, ss, first, w: np.zeros(3, dtype=np.float32)), lh.ShapeError, r"returned scores of shape \(3,\), expected"),
    (dict(scorer=lambda qs, ss, first, w: np.zeros((len(qs), len(ss) + 1))), lh.ShapeError, "returned scores of shape"),
    (dict(scorer=lambda qs, ss, first, w: np.zeros((1, 1, 1))), lh.ShapeError, "returned scores of shape"),
    (dict(scorer=lambda qs, ss, first, w: "not scores"), lh.PolicyError, "scorer raised"),
    (dict(scorer=lambda qs, ss, first, w: None), lh.ShapeError, r"returned scores of shape \(\)"),
    (dict(scorer=lambda qs: qs), lh.PolicyError, "scorer raised .*TypeError"),  # called with the wrong arity
    (dict(scorer=zeros_scorer, encoder=lambda q, k, v: np.zeros(5, dtype=np.float32), representation_floats=2 * D),
     lh.ShapeError, r"encoder: returned a representation of shape \(5,\)"),
    (dict(scorer=zeros_scorer, encoder=lambda q, k, v: 1 / 0, representation_floats=2 * D), lh.PolicyError, "encoder raised .*ZeroDivisionError"),
])
def test_every_error_a_python_policy_causes_is_a_longheads_error(policy, error, message):
    q, k, v = sequence(100, seed=6)
    a = layer(**policy)
    cache = a.make_cache()
    if "encoder" not in policy:  # ingest scores nothing: a cache with chunks to restore
        a.ingest(cache, q[:40], k[:40], v[:40])
    before = cache.copy()
    with pytest.raises(error, match=message) as raised:
        a.prefill(cache, q[40:], k[40:], v[40:])
    assert isinstance(raised.value, lh.Error)
    assert cache == before
    with pytest.raises(error, match=message):  # and again: each call's failure is its own
        a.prefill(cache, q[40:], k[40:], v[40:])
    assert cache == before


def test_zero_tokens_and_reversed_views_say_so():
    q, k, v = sequence(40, seed=10)
    a = layer()
    cache = a.make_cache()
    with pytest.raises(lh.ShapeError, match="q has 0 tokens, expected at least 1"):
        a.prefill(cache, q[:0], k[:0], v[:0])
    with pytest.raises(lh.ShapeError, match="reversed view"):
        a.prefill(cache, q[::-1], k, v)
    assert cache.tokens == 0
    # A positive token stride (every other token of a larger buffer) is read in place, bitwise.
    expected = a.prefill(a.make_cache(), np.ascontiguousarray(q[::2]), np.ascontiguousarray(k[::2]), np.ascontiguousarray(v[::2]))
    assert np.array_equal(a.prefill(a.make_cache(), q[::2], k[::2], v[::2]).view(np.uint32), expected.view(np.uint32))


def test_the_overhead_script_runs():
    python_us, cpp_us = load_example("overhead").measure(calls=64, rounds=1)  # asserts the two caches end equal
    assert python_us > 0 and cpp_us > 0


@pytest.mark.parametrize("policy", ["paper", "recommended"])
def test_batched_decode_gives_each_sequence_its_own_bits(policy):
    lengths = [40, 75, 130]
    data = [sequence(n + 12, seed=20 + i) for i, n in enumerate(lengths)]
    batched_layer, alone_layer = layer(policy=policy, threads=2), layer(policy=policy)
    batched, alone = [], []
    for (q, k, v), n in zip(data, lengths):
        for a, caches in ((batched_layer, batched), (alone_layer, alone)):
            caches.append(a.make_cache())
            a.prefill(caches[-1], q[:n], k[:n], v[:n])
    for step in range(12):
        active = [i for i in range(3) if not (i == 1 and step >= 6)]  # sequence 1 leaves after 6 steps
        rows = [lengths[i] + step for i in active]
        q = np.stack([data[i][0][r] for i, r in zip(active, rows)])
        k = np.stack([data[i][1][r] for i, r in zip(active, rows)])
        v = np.stack([data[i][2][r] for i, r in zip(active, rows)])
        out = batched_layer.decode_batch([batched[i] for i in active], q, k, v)
        for j, i in enumerate(active):
            single = alone_layer.decode(alone[i], q[j:j + 1], k[j:j + 1], v[j:j + 1])
            assert np.array_equal(out[j:j + 1].view(np.uint32), single.view(np.uint32))
    assert all(a == b for a, b in zip(batched, alone))
    with pytest.raises(lh.ShapeError, match="2 rows for 3 caches"):
        batched_layer.decode_batch(batched, q[:2], k[:2], v[:2])
    before = [c.copy() for c in batched]
    with pytest.raises(lh.ShapeError, match="sequence 0's cache is also sequence 1's"):
        batched_layer.decode_batch([batched[0], batched[0]], q[:2], k[:2], v[:2])
    assert all(a == b for a, b in zip(batched, before))


def test_caches_saved_and_loaded_decode_on_with_the_same_bits():
    q, k, v = sequence(200, seed=8)
    a = layer(policy="recommended")
    caches = [a.make_cache(), a.make_cache()]
    a.prefill(caches[0], q[:150], k[:150], v[:150])
    a.prefill(caches[1], q[:61], k[:61], v[:61])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "session.lhkv")
        a.save_caches(path, caches)
        loaded = a.load_caches(path, reserve=200)
        assert len(loaded) == 2 and all(x == y for x, y in zip(loaded, caches))
        for t in range(150, 200):
            assert np.array_equal(a.decode(caches[0], q[t:t + 1], k[t:t + 1], v[t:t + 1]).view(np.uint32),
                                  a.decode(loaded[0], q[t:t + 1], k[t:t + 1], v[t:t + 1]).view(np.uint32))
        with pytest.raises(lh.FileError, match="saved by a layer with another"):
            layer(policy="recommended", chunk_size=16).load_caches(path)
        with pytest.raises(lh.FileError, match="another shape"):  # no index: no boxes in the cache
            layer(policy="quest").load_caches(path)
        paper = layer(policy="paper")
        paper_path = os.path.join(tmp, "paper.lhkv")
        paper.save_caches(paper_path, [paper.make_cache()])
        with pytest.raises(lh.FileError, match="other policies"):  # the same summaries, scored another way
            layer(policy="paper-rotated").load_caches(paper_path)
        with open(path, "r+b") as f:
            f.seek(200)
            byte = f.read(1)
            f.seek(200)
            f.write(bytes([byte[0] ^ 1]))
        with pytest.raises(lh.FileError, match="corrupted"):
            a.load_caches(path)


def test_choice_fidelity_of_the_recommended_selection_against_the_flat_scan():
    # Below exact_below the recommended policy's beam is the flat scan: nothing lost. A choice
    # sharing none of the flat scan's chunks loses recall, and its figures are in range.
    q, k, v = sequence(400, seed=12)
    flat, beam = layer(policy="quest", budget_chunks=6), layer(policy="recommended", budget_chunks=6)
    cache, beam_cache = flat.make_cache(), beam.make_cache()
    _, flat_sel = flat.prefill(cache, q, k, v, selections=True)
    _, beam_sel = beam.prefill(beam_cache, q, k, v, selections=True)
    position, w, sink, local = 399, 8, 1, 2
    own = position // w
    first, end = sink, own - local + 1
    for head in range(HQ):
        ref = np.array([c for c in flat_sel[position, head] if first <= c < end], dtype=np.int32)
        got = np.array([c for c in beam_sel[position, head] if first <= c < end], dtype=np.int32)
        same = flat.choice_fidelity(cache, head, position, q[position, head], first, end, ref, got)
        assert same == {"recall": 1.0, "mass_recall": 1.0, "output_difference": 0.0}
        other = np.array([c for c in range(first, end) if c not in ref][:len(ref)], dtype=np.int32)
        f = flat.choice_fidelity(cache, head, position, q[position, head], first, end, ref, other)
        assert f["recall"] == 0.0 and f["mass_recall"] > 0.0 and f["output_difference"] > 0.0
    with pytest.raises(lh.ShapeError, match="not among the candidates"):
        flat.choice_fidelity(cache, 0, position, q[position, 0], first, end, np.array([end], dtype=np.int32), ref)
    with pytest.raises(lh.ShapeError, match="query must be"):
        flat.choice_fidelity(cache, 0, position, q[position], first, end, ref, ref)


def test_the_certified_policy_is_the_flat_scan_past_the_beams_exact_range():
    # 1,100 chunks of 4 tokens: past the beam's exact_below (1024 candidates), where the issue
    # found every row of the recommended policy differing from the flat scan. quest-certified
    # at epsilon 0 must give quest's selections and outputs bitwise; a bad epsilon is named.
    n = 4400
    q, k, v = sequence(n, seed=21)
    config = lh.AttentionConfig(n_q_heads=HQ, n_kv_heads=HKV, head_dim=D, chunk_size=4, budget_chunks=8)
    rope = lh.Rope(D, 10000.0, "half")
    flat = lh.Attention(config, rope, policy="quest")
    certified = lh.Attention(config, rope, policy="quest-certified")
    beam = lh.Attention(config, rope, policy="recommended")
    tail = slice(n - 8, n)
    flat_cache, cert_cache, beam_cache = flat.make_cache(), certified.make_cache(), beam.make_cache()
    for a, c in ((flat, flat_cache), (certified, cert_cache), (beam, beam_cache)):
        a.prefill(c, q[:n - 8], k[:n - 8], v[:n - 8])
    out, sel = flat.prefill(flat_cache, q[tail], k[tail], v[tail], selections=True)
    cert_out, cert_sel = certified.prefill(cert_cache, q[tail], k[tail], v[tail], selections=True)
    _, beam_sel = beam.prefill(beam_cache, q[tail], k[tail], v[tail], selections=True)
    assert np.array_equal(cert_sel, sel) and np.array_equal(cert_out, out)
    assert not np.array_equal(beam_sel, sel)  # the case is one the beam gets wrong
    with pytest.raises(lh.ConfigError, match="epsilon finite and >= 0"):
        lh.Attention(config, rope, policy="quest-certified", epsilon=-1.0)


def test_the_key_cluster_knobs_reach_the_index_and_a_whole_probe_is_the_flat_scan():
    # 1,100 chunks of 4 tokens, past exact_below: with the probe unlimited (every candidate may
    # be read) the cluster search certifies the flat scan's choice, so quest-clusters gives
    # quest's selections and outputs bitwise; with a probe of 8 chunks it does not. Bad knobs,
    # and cluster knobs on another policy, are named.
    n = 4400
    q, k, v = sequence(n, seed=25)
    config = lh.AttentionConfig(n_q_heads=HQ, n_kv_heads=HKV, head_dim=D, chunk_size=4, budget_chunks=8)
    rope = lh.Rope(D, 10000.0, "half")
    flat = lh.Attention(config, rope, policy="quest")
    whole = lh.Attention(config, rope, policy="quest-clusters", segment_chunks=256, segment_clusters=16, probe_share=1.0, probe_max=1 << 30)
    narrow = lh.Attention(config, rope, policy="quest-clusters", segment_chunks=256, segment_clusters=16, probe_share=0.0, probe_min=8,
                          probe_max=8, probe_order="box")
    # The whole probe held to 64 summaries read.
    budgeted = lh.Attention(config, rope, policy="quest-clusters", segment_chunks=256, segment_clusters=16, probe_share=1.0, probe_max=1 << 30,
                            read_max=64)
    tail = slice(n - 8, n)
    caches = [a.make_cache() for a in (flat, whole, narrow, budgeted)]
    results = []
    for a, c in zip((flat, whole, narrow, budgeted), caches):
        a.prefill(c, q[:n - 8], k[:n - 8], v[:n - 8])
        results.append(a.prefill(c, q[tail], k[tail], v[tail], selections=True))
    (out, sel), (whole_out, whole_sel), (_, narrow_sel), (_, budget_sel) = results
    assert np.array_equal(whole_sel, sel) and np.array_equal(whole_out, out)
    assert not np.array_equal(narrow_sel, sel)  # the knobs reached the index
    assert not np.array_equal(budget_sel, sel)
    with pytest.raises(lh.ConfigError, match="read_max >= 0"):
        lh.Attention(config, rope, policy="quest-clusters", read_max=-1)
    with pytest.raises(lh.ConfigError, match="probe_max >= probe_min"):
        lh.Attention(config, rope, policy="quest-clusters", probe_min=64, probe_max=8)
    with pytest.raises(lh.ConfigError, match="probe_order must be 'mixed' or 'box'"):
        lh.Attention(config, rope, policy="quest-clusters", probe_order="centre")
    with pytest.raises(lh.ConfigError, match="only for policy 'quest-clusters'"):
        lh.Attention(config, rope, policy="recommended", probe_share=0.5)


def test_the_key_cluster_policy_gives_the_same_bits_in_one_prefill_and_token_by_token():
    # 1,100 chunks of 4 tokens: past exact_below (1024 candidates), where the segments of 256
    # and 32 chunks (the levels below the default's 2048) are clustered, so the last queries search
    # clusters. One prefill and a prefill followed by single-token steps give the same selections
    # and outputs bit for bit.
    n = 4400
    q, k, v = sequence(n, seed=23)
    config = lh.AttentionConfig(n_q_heads=HQ, n_kv_heads=HKV, head_dim=D, chunk_size=4, budget_chunks=8)
    rope = lh.Rope(D, 10000.0, "half")
    assert "quest-clusters" in lh.policies()
    clusters = lh.Attention(config, rope, policy="quest-clusters")
    whole = clusters.make_cache()
    out, sel = clusters.prefill(whole, q, k, v, selections=True)
    stepped = clusters.make_cache()
    clusters.prefill(stepped, q[:n - 6], k[:n - 6], v[:n - 6])
    for t in range(n - 6, n):
        step_out, step_sel = clusters.prefill(stepped, q[t:t + 1], k[t:t + 1], v[t:t + 1], selections=True)
        assert np.array_equal(step_out[0], out[t]) and np.array_equal(step_sel[0], sel[t])
    flat = lh.Attention(config, rope, policy="quest")
    _, flat_sel = flat.prefill(flat.make_cache(), q, k, v, selections=True)
    assert np.array_equal(flat_sel[:4000], sel[:4000])  # up to 1024 candidates: the flat scan's choice
