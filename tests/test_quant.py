"""The int8 (Q8) and bfloat16 kernels of quant.h against float64 NumPy references written from
their definitions, their determinism, and the agreement of their instruction-set paths."""
import os
import platform
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cllm import _core

QK = 32


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def rel_err(actual, expected):
    """Largest absolute difference relative to the largest magnitude of the expected tensor."""
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


# ---- references ----------------------------------------------------------------------------

def ref_quantize(x):
    """Q8 of the rows of x: per block of 32 (zero padded), scale = amax / 127 in float32 and q
    the float32 quotient x / scale rounded half to even; q = 0 where the scale is 0."""
    x = np.asarray(x, np.float32)
    M, IC = x.shape
    K = -(-IC // QK) * QK
    padded = np.zeros((M, K), np.float32)
    padded[:, :IC] = x
    blocks = padded.reshape(M, K // QK, QK)
    scale = np.abs(blocks).max(axis=2) / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        quotient = blocks / scale[:, :, None]
    q = np.where(scale[:, :, None] == 0, 0, np.clip(np.rint(quotient), -127, 127))
    return q.astype(np.int8).reshape(M, K), scale.astype(np.float32)


def ref_dequantize(q, scale):
    return (q.reshape(q.shape[0], -1, QK).astype(np.float64) * scale[:, :, None]).reshape(q.shape)


def bf16_value(bits):
    """float64 value of bfloat16 bits, with the infinities as 2^128: the value the IEEE rounding
    rule gives them when it picks the nearer of two neighbours."""
    bits = np.asarray(bits, np.uint32)
    values = (bits << 16).view(np.float32).astype(np.float64)
    return np.where(np.isinf(values), np.sign(values) * 2.0**128, values)


def ref_bf16(x):
    """Round finite float32 to bfloat16 by choosing, in float64, the nearer of the two bf16
    neighbours of x (its truncation and the next one away from zero), the even one on a tie."""
    x = np.asarray(x, np.float32)
    down = x.view(np.uint32) >> 16
    up = down + 1
    exact = x.astype(np.float64)
    d_down = np.abs(exact - bf16_value(down))
    d_up = np.abs(bf16_value(up) - exact)
    pick_up = (d_up < d_down) | ((d_up == d_down) & (down % 2 == 1))
    return np.where(pick_up, up, down).astype(np.uint16)


def bf16_float64(bits):
    return (np.asarray(bits, np.uint32) << 16).view(np.float32).astype(np.float64)


# ---- Q8 quantizer --------------------------------------------------------------------------

@pytest.mark.parametrize("IC", [1, 31, 32, 33, 100, 384])
def test_quantize_q8_matches_reference(rng, IC):
    x = rng.standard_normal((5, IC)) * rng.choice([1e-3, 1.0, 50.0], size=(5, 1))
    x[2, : min(IC, QK)] = 0.0                      # a zero block (all of the row when IC <= 32)
    q, scale = _core.quantize_q8(f32(x))
    q_ref, scale_ref = ref_quantize(x)
    K = -(-IC // QK) * QK
    assert q.dtype == np.int8 and q.shape == (5, K)
    assert scale.dtype == np.float32 and scale.shape == (5, K // QK)
    np.testing.assert_array_equal(scale, scale_ref)
    np.testing.assert_array_equal(q, q_ref)
    assert scale[2, 0] == 0 and not q[2, :QK].any()
    assert not q[:, IC:].any()                     # the padding
    assert np.abs(q).max() <= 127


def test_quantize_q8_extremes_and_ties():
    # amax 127 makes the scale exactly 1, so the quotients are the values themselves
    block = np.zeros(QK, np.float32)
    block[:8] = [127.0, -127.0, 2.5, 3.5, -2.5, 0.5, -0.5, 126.4]
    q, scale = _core.quantize_q8(f32(block[None, :]))
    assert scale[0, 0] == 1.0
    np.testing.assert_array_equal(q[0, :8], [127, -127, 2, 4, -2, 0, 0, 126])
    # values at +-amax of any magnitude give +-127
    x = np.array([[0.3, -0.7, 0.7, 0.1] + [0.0] * 28 + [-1e-20, 5e-21, 0.0]], np.float32)
    q, scale = _core.quantize_q8(x)
    assert q[0, 1] == -127 and q[0, 2] == 127 and q[0, 32] == -127
    np.testing.assert_array_equal(q, ref_quantize(x)[0])


def test_dequantize_q8(rng):
    x = f32(rng.standard_normal((4, 70)))
    q, scale = _core.quantize_q8(x)
    out = _core.dequantize_q8(q, scale, 70)
    np.testing.assert_array_equal(out, ref_dequantize(q, scale)[:, :70].astype(np.float32))
    assert np.abs(out - x).max() <= np.abs(x).max() / 254 * 1.0001   # half a step of 1/127
    with pytest.raises(ValueError):
        _core.dequantize_q8(q, scale, 100)


# ---- Q8 product ----------------------------------------------------------------------------

@pytest.mark.parametrize("M,IC,OC", [(1, 384, 1152), (7, 100, 13), (64, 33, 100), (3, 1536, 40)])
def test_q8_linear_matches_references(rng, M, IC, OC):
    x, b = rng.standard_normal((M, IC)), rng.standard_normal(OC)
    W = rng.standard_normal((OC, IC)) * 0.05
    q, scale = _core.quantize_q8(f32(W))
    y = _core.q8_linear(f32(x), q, scale, f32(b), 2)
    assert y.dtype == np.float32 and y.shape == (M, OC)
    xq, xs = ref_quantize(x)
    exact = ref_dequantize(xq, xs) @ ref_dequantize(q, scale).T + f32(b)
    assert rel_err(y, exact) < 1e-5                # only the float32 accumulation differs
    assert rel_err(y, x @ W.T + b) < 0.02          # the int8 error of random normal data


def test_q8_linear_extreme_values_do_not_saturate():
    # every q is +-127, so maddubs meets its largest pairwise sums, 2 * 127 * 127, of both signs
    rng = np.random.default_rng(7)
    x = rng.choice([-1.0, 1.0], (3, 256))
    W = rng.choice([-2.0, 2.0], (9, 256))
    W[0] = 2.0
    x[0] = 1.0
    x[1] = -1.0
    q, scale = _core.quantize_q8(f32(W))
    assert np.abs(q).min() == 127
    y = _core.q8_linear(f32(x), q, scale, None, 1)
    assert rel_err(y, x @ W.T) < 1e-6


# ---- bfloat16 ------------------------------------------------------------------------------

def test_bf16_round_matches_reference(rng):
    finite = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    finite = finite[np.isfinite(finite.view(np.float32))]
    special = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,   # ties: down, up (even)
                        0x3F808001, 0x3F807FFF,                           # just above, below a tie
                        0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000,   # largest finite / to inf
                        0x00000001, 0x00008000, 0x00018000, 0x00007FFF,   # subnormals
                        0x00000000, 0x80000000], np.uint32)               # +0, -0
    x = np.concatenate([finite, special]).view(np.float32)
    got = _core.bf16_round(x)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, ref_bf16(x))
    assert list(got[-10:-6]) == [0x7F7F, 0x7F80, 0x7F80, 0xFF80]
    assert list(got[-2:]) == [0x0000, 0x8000]
    assert list(_core.bf16_round(np.array([np.inf, -np.inf], np.float32))) == [0x7F80, 0xFF80]


def test_bf16_round_keeps_nan():
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F80FFFF, 0xFF800001, 0x7FFFFFFF],
                    np.uint32).view(np.float32)
    got = _core.bf16_round(nans)
    assert np.isnan(bf16_float64(got)).all()
    np.testing.assert_array_equal(got >> 15, nans.view(np.uint32) >> 31)   # the sign


def test_bf16_to_float(rng):
    bits = rng.integers(0, 2**16, 1000).astype(np.uint16)
    np.testing.assert_array_equal(_core.bf16_to_float(bits).view(np.uint32),
                                  bits.astype(np.uint32) << 16)


@pytest.mark.parametrize("M,IC,OC", [(1, 384, 1152), (7, 100, 13), (64, 33, 100), (2, 1, 5)])
def test_bf16_linear_matches_reference(rng, M, IC, OC):
    x, W, b = rng.standard_normal((M, IC)), rng.standard_normal((OC, IC)), rng.standard_normal(OC)
    w = _core.bf16_round(f32(W).ravel()).reshape(OC, IC)
    y = _core.bf16_linear(f32(x), w, f32(b), 2)
    assert y.dtype == np.float32 and y.shape == (M, OC)
    assert rel_err(y, f32(x).astype(np.float64) @ bf16_float64(w).T + f32(b)) < 1e-5
    assert rel_err(y, x @ W.T + b) < 0.01          # bf16 keeps 8 significant bits


# ---- determinism ---------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(M=st.sampled_from([1, 2, 7, 64]), IC=st.integers(1, 200), OC=st.sampled_from([1, 13, 100]),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_same_bits_for_any_threads_and_rows(M, IC, OC, with_bias, seed):
    """Each output depends on its inputs alone: not on the thread count, nor on the other rows
    computed by the same call."""
    rng = np.random.default_rng(seed)
    x, W = f32(rng.standard_normal((M, IC))), f32(rng.standard_normal((OC, IC)))
    b = f32(rng.standard_normal(OC)) if with_bias else None
    q, scale = _core.quantize_q8(W)
    w = _core.bf16_round(W.ravel()).reshape(OC, IC)
    for linear, weights in ((_core.q8_linear, (q, scale)), (_core.bf16_linear, (w,))):
        y = linear(x, *weights, b, 1)
        for threads in (2, 3):
            np.testing.assert_array_equal(linear(x, *weights, b, threads), y)
        rows = np.concatenate([linear(x[m:m + 1], *weights, b, 2) for m in range(M)])
        np.testing.assert_array_equal(rows, y)


def test_linear_shapes_are_checked(rng):
    x = f32(rng.standard_normal((2, 40)))
    q, scale = _core.quantize_q8(f32(rng.standard_normal((5, 40))))
    w = _core.bf16_round(f32(rng.standard_normal(200))).reshape(5, 40)
    with pytest.raises(ValueError, match="width"):
        _core.q8_linear(f32(rng.standard_normal((2, 70))), q, scale, None, 1)
    with pytest.raises(ValueError, match="width"):
        _core.q8_linear(x, q, scale[:, :1].copy(), None, 1)
    with pytest.raises(ValueError, match="bias"):
        _core.q8_linear(x, q, scale, f32(np.zeros(4)), 1)
    with pytest.raises(ValueError, match="threads"):
        _core.bf16_linear(x, w, None, 0)
    with pytest.raises(ValueError, match="width"):
        _core.bf16_linear(f32(rng.standard_normal((2, 41))), w, None, 1)
    with pytest.raises(ValueError, match="empty"):
        _core.bf16_linear(np.zeros((2, 0), np.float32), np.zeros((5, 0), np.uint16), None, 1)
    assert _core.q8_linear(x[:0], q, scale, None, 1).shape == (0, 5)
    assert _core.bf16_linear(x[:0], w, None, 1).shape == (0, 5)


# ---- the instruction-set paths -------------------------------------------------------------

# name: (compiler flags, /proc/cpuinfo flags needed to run it)
PATHS = {
    "plain C": (["-march=x86-64"], []),
    "AVX2": (["-march=haswell"], ["avx2", "fma"]),
    "AVX-VNNI": (["-march=haswell", "-mavxvnni"], ["avx2", "fma", "avx_vnni"]),
    "AVX-512 VNNI": (["-march=haswell", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
                     ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"]),
    "native": (["-march=native"], []),
}


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64")
                    or not os.path.exists("/proc/cpuinfo"), reason="the vector paths are x86 ones")
def test_every_path_gives_the_same_bits(tmp_path):
    """tests/quant_paths.c compiled for each path; every path this CPU runs must give the same
    bytes as the plain C one (and, the program checks, the same bits over pieces of the output
    range as over the whole), and every path the compiler knows must at least compile."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    here = os.path.dirname(os.path.abspath(__file__))
    include = os.path.join(os.path.dirname(here), "src", "cllm")
    base = [cc, "-O2", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-I", include]
    (tmp_path / "empty.c").write_text("int main(void) { return 0; }\n")
    flags, outputs = cpu_flags(), {}
    for name, (cflags, needed) in PATHS.items():
        probe = subprocess.run(base + cflags + [str(tmp_path / "empty.c"), "-o",
                                                str(tmp_path / "probe")], capture_output=True)
        if probe.returncode != 0:
            continue                                 # a compiler too old for these flags
        exe = tmp_path / name.replace(" ", "_")
        build = subprocess.run(base + cflags + [os.path.join(here, "quant_paths.c"), "-o",
                                                str(exe), "-lm"], capture_output=True, text=True)
        assert build.returncode == 0, f"{name}: {build.stderr}"
        if set(needed) <= flags:
            outputs[name] = subprocess.run([str(exe)], capture_output=True, check=True).stdout
    assert "plain C" in outputs and len(outputs["plain C"]) > 0
    for name, out in outputs.items():
        assert out == outputs["plain C"], f"{name} differs from plain C"
