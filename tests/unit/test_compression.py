"""Codecs: wire sizes, round trips, and error feedback that gets every value to the server
eventually."""

import numpy as np
import pytest

from raytrain_ft.compression import (
    FP16,
    ONEBIT_BLOCK,
    ErrorFeedback,
    NoCodec,
    OneBit,
    TopK,
    decode,
    decode_push,
    parse_codec,
)

RNG = np.random.default_rng(0)
X = RNG.standard_normal(10_000).astype(np.float32)


@pytest.mark.parametrize(
    "spec, ratio",
    [
        ("none", 1.0),
        ("fp16", 0.5),
        ("topk:0.01", 0.02),
        ("topk:0.1", 0.2),
        ("onebit", 1 / 32 + 1 / 512),
    ],
)
def test_wire_bytes_match_the_expected_ratio(spec, ratio):
    codec = parse_codec(spec)
    e = codec.encode(X)
    assert e.nbytes == codec.expected_bytes(X.size)
    assert e.nbytes / X.nbytes == pytest.approx(ratio, rel=0.01)


def test_none_and_fp16_round_trip():
    assert np.array_equal(decode(NoCodec().encode(X)), X)
    assert np.allclose(decode(FP16().encode(X)), X, rtol=1e-3, atol=1e-4)


def test_topk_keeps_exactly_the_largest_magnitudes():
    x = np.array([0.1, -5.0, 0.2, 3.0, -0.3], dtype=np.float32)
    out = decode(TopK(0.4).encode(x))
    assert np.array_equal(out, np.array([0, -5.0, 0, 3.0, 0], dtype=np.float32))


def test_onebit_keeps_signs_and_each_blocks_mean_magnitude():
    x = np.array([1.0, -3.0, 0.5, -0.5], dtype=np.float32)
    out = decode(OneBit().encode(x))
    assert np.array_equal(np.sign(out), np.sign(x)) and np.allclose(np.abs(out), 1.25)
    big = np.concatenate(
        [np.full(ONEBIT_BLOCK, -2.0, np.float32), np.full(10, 0.01, np.float32)]
    )  # a last, short block
    out = decode(OneBit().encode(big))
    assert np.allclose(out[:ONEBIT_BLOCK], -2.0) and np.allclose(out[ONEBIT_BLOCK:], 0.01)


def test_tail_values_travel_uncompressed():
    ef = ErrorFeedback(OneBit(), 3)
    tail = np.array([7.0, 8.0], dtype=np.float32)
    out = decode_push(ef.encode(np.array([1.0, -2.0, 3.0], dtype=np.float32), tail))
    assert out.shape == (5,) and np.array_equal(out[3:], tail)


def _sent_and_received(encode, pushes=300, n=2_000):
    """Totals over many pushes of what a worker sent and what the server decoded."""
    sent = np.zeros(n, np.float64)
    received = np.zeros(n, np.float64)
    rng = np.random.default_rng(1)
    for _ in range(pushes):
        g = rng.standard_normal(n).astype(np.float32) + 0.1
        sent += g
        received += decode(encode(g))
    return sent, received


@pytest.mark.parametrize("spec", ["topk:0.01", "onebit", "fp16"])
def test_error_feedback_delivers_the_sum_of_pushes(spec):
    """With error feedback, what the server received over many pushes differs from what the worker
    sent by exactly the residual still held (bounded), so nothing is dropped for good."""
    ef = ErrorFeedback(parse_codec(spec), 2_000)
    sent, received = _sent_and_received(ef.encode)
    assert np.allclose(sent - received, ef.residual, atol=1e-2)
    # the error stays the size of the residual while the sent sum keeps growing (top-k without
    # feedback: ~99% lost)
    assert np.abs(sent - received).mean() < 0.2 * np.abs(sent).mean()


def test_without_error_feedback_topk_loses_most_of_the_gradient():
    sent, received = _sent_and_received(TopK(0.01).encode)
    assert np.abs(sent - received).mean() > 0.8 * np.abs(sent).mean()


@pytest.mark.parametrize("bad", ["topk", "topk:2", "topk:x", "gzip", "fp16:3"])
def test_bad_codec_specs_name_the_fix(bad):
    with pytest.raises(ValueError, match="codec|ratio"):
        parse_codec(bad)


def _tied(n=5_000):
    """Gradient-like values with many ties, at the top-k threshold too, and zeros."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(n).astype(np.float32)
    x[::7] = 0.0
    x[::11] = np.float32(1.5)
    x[::13] = np.float32(-1.5)
    x[::25] = np.float32(-9.0)  # 200 equal largest magnitudes: top-k of 1% cuts through them
    return x


@pytest.mark.parametrize("spec", ["none", "fp16", "topk:0.01", "topk:0.3", "topk:1", "onebit"])
@pytest.mark.parametrize(
    "x", [X, _tied(), X[:700], np.zeros(0, np.float32)], ids=["randn", "tied", "short", "empty"]
)
def test_the_torch_encoder_gives_the_numpy_encoders_bits(spec, x):
    """GPU workers encode with torch on the device: the payload is the numpy codec's, bit for bit,
    and so is the decoded vector their error feedback subtracts."""
    import torch

    from raytrain_ft.compression import decode_torch

    if x.size == 0 and spec.startswith("topk"):
        pytest.skip("top-k of nothing")
    codec = parse_codec(spec)
    want = codec.encode(x)
    got = codec.encode_torch(torch.from_numpy(x.copy()))
    assert len(got) == len(want.arrays)
    for g, w in zip(got, want.arrays):
        assert g.numpy().dtype == w.dtype and np.array_equal(
            g.numpy().view(np.uint8), w.view(np.uint8)
        )
    assert np.array_equal(
        decode_torch(codec.name, x.size, got).numpy().view(np.uint8), decode(want).view(np.uint8)
    )


def test_topk_breaks_ties_at_the_threshold_by_the_lowest_index():
    x = np.array([1.0, -2.0, 2.0, 0.5, 2.0, -2.0], dtype=np.float32)
    idx, values = TopK(0.5).encode(x).arrays
    assert idx.tolist() == [1, 2, 4] and values.tolist() == [-2.0, 2.0, 2.0]


@pytest.mark.parametrize("spec", ["topk:0.01", "onebit", "fp16"])
def test_error_feedback_on_a_device_keeps_the_numpy_residual_bit_for_bit(spec):
    """The device path of error feedback (here on CPU tensors) sends the same pushes and keeps the
    same residual as the numpy path, push after push; the residual goes to the host and back."""
    import torch

    host, dev = (
        ErrorFeedback(parse_codec(spec), 3_000),
        ErrorFeedback(parse_codec(spec), 3_000, "cpu"),
    )
    rng = np.random.default_rng(4)
    for step in range(20):
        g = rng.standard_normal(3_000).astype(np.float32)
        tail = rng.standard_normal(4).astype(np.float32)
        a, b = host.encode(g, tail), dev.encode(torch.from_numpy(g.copy()), torch.from_numpy(tail))
        assert np.array_equal(decode_push(a), decode_push(b))
        assert np.array_equal(host.residual, dev.residual_host())
        if step == 10:  # a restarted rank gets its residual back from the shard
            dev.set_residual(host.residual.copy())
    g[:] = 0
    assert not np.shares_memory(dev.encode(torch.from_numpy(g)).arrays[-1], g)
