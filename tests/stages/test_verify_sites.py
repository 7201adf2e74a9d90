"""verify's per-site check: every folded layer against the original's layer+BN, in float64, on
the original's own activation, within the bound one rounding of the fused weights allows.

Honest folds pass in float16 and float32, folded by bnfold or in float32 arithmetic by hand; a
0.5 % scale on one channel's weights or a 0.01 bias shift fails naming that layer, also where the
outputs (at float16's tolerances) cannot see it. The bound is recomputed here in numpy from its
documented formula and compared with what verify reports."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.cli import run as cli
from onnx_builders import bn_inits, bn_node, init, make_model, vi
from numpy_ref import conv as ref_conv

DTYPES = {"float16": (np.float16, TensorProto.FLOAT16), "float32": (np.float32, TensorProto.FLOAT)}
LAYERS = ("conv", "depthwise", "up", "fc")  # Conv, depthwise Conv, ConvTranspose, Gemm
EPS = 1e-5


def small_cnn(dtype: str, seed: int = 0) -> onnx.ModelProto:
    """Conv → BN → Relu → depthwise Conv → BN → Relu → ConvTranspose → BN → Relu → pool → Gemm → BN."""
    np_type, elem = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    w = lambda *shape: init_of(rng.normal(0, 0.4, shape).astype(np_type))  # noqa: E731
    inits = [init("conv_w", w(8, 3, 3, 3)), init("depthwise_w", w(8, 1, 3, 3)), init("up_w", w(8, 4, 2, 2)),
             init("up_b", w(4)), init("fc_w", w(6, 4)), init("fc_b", w(6))]
    for name, channels in (("bn_conv", 8), ("bn_depthwise", 8), ("bn_up", 4), ("bn_fc", 6)):
        inits += bn_inits(name, channels, rng, np_type)
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c1", "b1", "bn_conv", EPS), helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Conv", ["r1", "depthwise_w"], ["c2"], name="depthwise", pads=[1, 1, 1, 1], group=8),
        bn_node("c2", "b2", "bn_depthwise", EPS), helper.make_node("Relu", ["b2"], ["r2"]),
        helper.make_node("ConvTranspose", ["r2", "up_w", "up_b"], ["c3"], name="up", strides=[2, 2]),
        bn_node("c3", "b3", "bn_up", EPS), helper.make_node("Relu", ["b3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["g"], name="fc", transB=1),
        bn_node("g", "y", "bn_fc", EPS),
    ]
    return make_model(nodes, [vi("x", [2, 3, 10, 10], elem)], [vi("y", [2, 6], elem)], inits)


def init_of(array):
    return array


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def set_array(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    t = next(t for t in model.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(array, name))


def layer(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def output_axis(node: onnx.NodeProto) -> int:
    """The weight axis of the output channel: 1 for ConvTranspose, 0 for Conv and Gemm(transB=1)."""
    return 1 if node.op_type == "ConvTranspose" else 0


def fold_in_float32(original: onnx.ModelProto, fused: onnx.ModelProto) -> onnx.ModelProto:
    """Another honest fold: s = γ/√(σ²+ε), W·s and (b − μ)·s + β computed in float32 numpy from the
    original's parameters, then rounded to the model's dtype, written over bnfold's fused weights."""
    out = onnx.ModelProto()
    out.CopyFrom(fused)
    mine = arrays(original)
    producer = {o: n for n in original.graph.node for o in n.output}
    for bn in (n for n in original.graph.node if n.op_type == "BatchNormalization"):
        node = producer[bn.input[0]]
        gamma, beta, mean, var = (mine[i].astype(np.float32) for i in bn.input[1:5])
        s = gamma / np.sqrt(var + np.float32(EPS))
        weight = mine[node.input[1]].astype(np.float32)
        bias = mine[node.input[2]].astype(np.float32) if len(node.input) > 2 else np.zeros_like(s)
        shape = [1] * weight.ndim
        shape[output_axis(node)] = -1
        target = layer(out, node.name)
        dtype = mine[node.input[1]].dtype
        set_array(out, target.input[1], (weight * s.reshape(shape)).astype(dtype))
        set_array(out, target.input[2], ((bias - mean) * s + beta).astype(dtype))
    return out


def sabotage(fused: onnx.ModelProto, name: str, kind: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(fused)
    node = layer(out, name)
    if kind == "weight ×1.005":
        w = arrays(out)[node.input[1]].copy()
        axis = output_axis(node)
        index = [slice(None)] * w.ndim
        index[axis] = w.shape[axis] // 2
        w[tuple(index)] = (w[tuple(index)].astype(np.float64) * 1.005).astype(w.dtype)
        set_array(out, node.input[1], w)
    else:
        b = arrays(out)[node.input[2]].copy()
        b[b.size // 2] += b.dtype.type(0.01)
        set_array(out, node.input[2], b)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per dtype: the original, bnfold's fold and the float32-arithmetic fold, as files."""
    out = tmp_path_factory.mktemp("sites")
    result = {}
    for dtype in DTYPES:
        original = small_cnn(dtype)
        fused, report = bnfold.fuse_onnx(onnx.ModelProto.FromString(original.SerializeToString()))
        assert len(report.folded) == 4 and not report.skipped
        paths = {"original": out / f"{dtype}.onnx", "bnfold": out / f"{dtype}.fused.onnx",
                 "float32 arithmetic": out / f"{dtype}.fp32fold.onnx"}
        onnx.save(original, str(paths["original"]))
        onnx.save(fused, str(paths["bnfold"]))
        onnx.save(fold_in_float32(original, fused), str(paths["float32 arithmetic"]))
        result[dtype] = (paths, fused)
    return result


def verify_json(capsys, original: Path, fused: Path, *extra: str) -> tuple[int, dict]:
    code = cli(["verify", str(original), str(fused), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("way", ["bnfold", "float32 arithmetic"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_honest_folds_pass_every_site(models, capsys, dtype, way):
    paths, _ = models[dtype]
    code, report = verify_json(capsys, paths["original"], paths[way], "--batches", "2")
    assert code == 0, report
    assert report["passed"] and report["outputs_passed"] and report["sites_passed"] is True
    assert report["decided_by"] == "outputs and fold sites"
    assert sorted(s["layer"] for s in report["sites"]) == sorted(LAYERS)
    assert not report["skipped_sites"]
    for site in report["sites"]:
        assert site["passed"] and 0 < site["ratio"] <= 1 and site["dtype"] == dtype
        assert set(site["ratios"]) == {"elementwise", "bias", "channel"}
        assert len(site["folded"]) == 1 and site["folded"][0].startswith("BatchNormalization")


@pytest.mark.parametrize("kind", ["weight ×1.005", "bias +0.01"])
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sabotage_fails_naming_the_site(models, capsys, tmp_path, dtype, name, kind):
    paths, fused = models[dtype]
    bad = tmp_path / "bad.onnx"
    onnx.save(sabotage(fused, name, kind), str(bad))
    code, report = verify_json(capsys, paths["original"], bad)
    assert code == 1
    assert not report["passed"] and report["sites_passed"] is False
    assert "fold sites" in report["decided_by"]
    failed = [s for s in report["sites"] if not s["passed"]]
    assert [s["layer"] for s in failed] == [name]
    assert failed[0]["ratio"] > 1 and "not an exact fold" in failed[0]["message"]
    if dtype == "float16":  # float16's output tolerance cannot see it; the site check does
        assert report["outputs_passed"] and report["decided_by"] == "fold sites"


def test_a_failing_site_is_named_in_the_rich_report(models, capsys, tmp_path):
    paths, fused = models["float16"]
    bad = tmp_path / "bad.onnx"
    onnx.save(sabotage(fused, "depthwise", "weight ×1.005"), str(bad))
    assert cli(["verify", str(paths["original"]), str(bad)]) == 1
    text = capsys.readouterr().out
    assert "depthwise" in text and "fold sites" in text and "FAIL" in text


def test_fuse_verify_checks_the_sites_it_folded(models, tmp_path, capsys):
    paths, _ = models["float16"]
    out = tmp_path / "m.fused.onnx"
    assert cli(["fuse", str(paths["original"]), "-o", str(out), "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.exists()
    assert report["verify"]["sites_passed"] is True and len(report["verify"]["sites"]) == 4


def test_renamed_site_is_skipped_and_the_outputs_decide(models, capsys, tmp_path):
    """A tool that renames the tensors around a fold leaves the site unmatched: it is listed as
    not checked, with why, and the outputs alone give the verdict."""
    paths, fused = models["float32"]
    renamed = onnx.ModelProto()
    renamed.CopyFrom(fused)
    node = layer(renamed, "conv")
    old = node.output[0]
    node.output[0] = "renamed"
    for n in renamed.graph.node:
        n.input[:] = ["renamed" if i == old else i for i in n.input]
    path = tmp_path / "renamed.onnx"
    onnx.save(renamed, str(path))
    code, report = verify_json(capsys, paths["original"], path)
    assert code == 0 and report["passed"]
    assert sorted(s["layer"] for s in report["sites"]) == ["depthwise", "fc", "up"]
    assert [s["name"] for s in report["skipped_sites"]] == ["BatchNormalization 'bn_conv'"]
    assert "renamed?" in report["skipped_sites"][0]["reason"]


# -- the bound, recomputed ----------------------------------------------------------------------

U16, ETA16, U32 = 2.0 ** -11, 2.0 ** -25, 2.0 ** -24


def conv_bn(seed: int = 3) -> tuple[onnx.ModelProto, dict]:
    """One float16 Conv+BN: 4 → 3 channels, 3×3, no padding."""
    rng = np.random.default_rng(seed)
    p = {"w": rng.normal(0, 0.3, (3, 4, 3, 3)).astype(np.float16), "b": rng.normal(0, 0.3, 3).astype(np.float16),
         "gamma": rng.uniform(0.5, 1.5, 3).astype(np.float16), "beta": rng.normal(0, 0.5, 3).astype(np.float16),
         "mean": rng.normal(0, 0.5, 3).astype(np.float16), "var": rng.uniform(0.3, 2, 3).astype(np.float16)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn",
                              epsilon=EPS)]
    model = make_model(nodes, [vi("x", [1, 4, 6, 6], TensorProto.FLOAT16)], [vi("y", [1, 3, 4, 4], TensorProto.FLOAT16)],
                       [init(k, v) for k, v in p.items()])
    return model, {k: v.astype(np.float64) for k, v in p.items()}


def test_reported_ratio_is_the_documented_bound(tmp_path, capsys):
    """bound = r·(|W'|⋆|x| + |b'|) + η·(1⋆|x| + 1) + 8·u₃₂·|y_o|, r = u/(1−u), with |y_o| the
    magnitudes the original computes with, (1 + 2r)·(|W'|⋆|x| + |b'|) + |s|·(|b| + |μ|) + |β|,
    element by element, computed here in numpy; a
    channel whose weights are each two steps larger than rounded, fed positive inputs, must fail by
    the ratio numpy finds."""
    model, p = conv_bn()
    x = np.random.default_rng(1).uniform(0.5, 2.0, (1, 4, 6, 6)).astype(np.float16)
    s = p["gamma"] / np.sqrt(p["var"] + np.float64(np.float32(EPS)))
    exact_w, exact_b = p["w"] * s[:, None, None, None], (p["b"] - p["mean"]) * s + p["beta"]
    w16, b16 = exact_w.astype(np.float16), exact_b.astype(np.float16)
    away = np.where(w16[1] > 0, np.float16(np.inf), np.float16(-np.inf))  # every |weight| of channel 1 up
    w16[1] = np.nextafter(np.nextafter(w16[1], away), away)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    del fused.graph.node[1:]
    fused.graph.node[0].input[1:] = ["w_f", "b_f"]
    fused.graph.node[0].output[0] = "y"
    fused.graph.initializer.extend([init("w_f", w16), init("b_f", b16)])
    for path, m in (("o.onnx", model), ("f.onnx", fused)):
        onnx.save(m, str(tmp_path / path))
    np.savez(tmp_path / "x.npz", x=x)
    code, report = verify_json(capsys, tmp_path / "o.onnx", tmp_path / "f.onnx", "--data", str(tmp_path / "x.npz"))

    xs, u = x.astype(np.float64), U16 / (1 - U16)
    y_o = (ref_conv(xs, p["w"], p["b"]) - p["mean"][None, :, None, None]) * s[None, :, None, None] \
        + p["beta"][None, :, None, None]
    y_f = ref_conv(xs, w16.astype(np.float64), b16.astype(np.float64))
    magnitude_f = ref_conv(xs, np.abs(w16.astype(np.float64)), np.abs(b16.astype(np.float64)))
    magnitude_o = magnitude_f * (1 + 2 * u) + (np.abs(s) * (np.abs(p["b"]) + np.abs(p["mean"]))
                                               + np.abs(p["beta"]))[None, :, None, None]
    bound = u * magnitude_f + ETA16 * (ref_conv(xs, np.ones(w16.shape)) + 1) + 8 * U32 * magnitude_o
    expected = float(np.max(np.abs(y_f - y_o) / bound))
    assert expected > 1  # two roundings, lined up with the inputs' signs
    assert code == 1
    site = report["sites"][0]
    assert site["layer"] == "conv" and not site["passed"]
    assert site["ratios"]["elementwise"] == pytest.approx(expected, rel=1e-6)
    assert site["channel"] == 1


def test_a_bias_two_roundings_off_fails_by_the_zero_input_bound(tmp_path, capsys):
    """At x = 0 only the bias is left: |Δb'| against u/(1−u)·|b'| + η + 8·u₃₂·(|s|·(|b| + |μ|) + |β|)."""
    model, p = conv_bn(seed=4)
    s = p["gamma"] / np.sqrt(p["var"] + np.float64(np.float32(EPS)))
    exact_b = (p["b"] - p["mean"]) * s + p["beta"]
    w16, b16 = (p["w"] * s[:, None, None, None]).astype(np.float16), exact_b.astype(np.float16)
    b16[2] = np.nextafter(np.nextafter(b16[2], np.float16(-np.inf)), np.float16(-np.inf))
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    del fused.graph.node[1:]
    fused.graph.node[0].input[1:] = ["w_f", "b_f"]
    fused.graph.node[0].output[0] = "y"
    fused.graph.initializer.extend([init("w_f", w16), init("b_f", b16)])
    onnx.save(model, str(tmp_path / "o.onnx"))
    onnx.save(fused, str(tmp_path / "f.onnx"))
    code, report = verify_json(capsys, tmp_path / "o.onnx", tmp_path / "f.onnx")
    bound = (U16 / (1 - U16)) * np.abs(b16.astype(np.float64)) + ETA16 \
        + 8 * U32 * (np.abs(s) * (np.abs(p["b"]) + np.abs(p["mean"])) + np.abs(p["beta"]))
    expected = np.abs(b16.astype(np.float64) - exact_b) / bound
    assert expected[2] > 1
    assert code == 1
    site = report["sites"][0]
    assert site["ratios"]["bias"] == pytest.approx(float(expected.max()), rel=1e-6)
    assert site["test"] == "bias" and site["channel"] == 2


# -- other site shapes ------------------------------------------------------------------------------


def repvgg_block(dtype: str) -> onnx.ModelProto:
    """Conv3×3 → BN + Conv1×1 → BN + BN(x), summed: bnfold merges it into one Conv (one site of 3 BNs)."""
    np_type, elem = DTYPES[dtype]
    rng = np.random.default_rng(5)
    inits = [init("w3", rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np_type)),
             init("w1", rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np_type))]
    for name in ("bn3", "bn1", "bnid"):
        inits += bn_inits(name, 4, rng, np_type)
    nodes = [helper.make_node("Conv", ["x", "w3"], ["c3"], name="c3", pads=[1, 1, 1, 1]), bn_node("c3", "b3", "bn3"),
             helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1"), bn_node("c1", "b1", "bn1"),
             bn_node("x", "bid", "bnid"), helper.make_node("Add", ["b3", "b1"], ["s1"]),
             helper.make_node("Add", ["s1", "bid"], ["s2"]), helper.make_node("Relu", ["s2"], ["y"])]
    return make_model(nodes, [vi("x", [2, 4, 6, 6], elem)], [vi("y", [2, 4, 6, 6], elem)], inits)


def bn_then_linear(dtype: str) -> onnx.ModelProto:
    """BN → Gemm: folded into the layer after it (the site runs from the BN's input)."""
    np_type, elem = DTYPES[dtype]
    rng = np.random.default_rng(6)
    inits = bn_inits("bn", 6, rng, np_type) + [init("w", rng.normal(0, 0.3, (4, 6)).astype(np_type)),
                                               init("b", rng.normal(0, 0.3, 4).astype(np_type))]
    nodes = [bn_node("x", "n", "bn"), helper.make_node("Gemm", ["n", "w", "b"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [vi("x", [16, 6], elem)], [vi("y", [16, 4], elem)], inits)


def matmul_add_bn(dtype: str) -> onnx.ModelProto:
    """MatMul → Add(bias) → BN over features."""
    np_type, elem = DTYPES[dtype]
    rng = np.random.default_rng(8)
    inits = [init("w", rng.normal(0, 0.3, (5, 4)).astype(np_type)), init("b", rng.normal(0, 0.3, 4).astype(np_type))]
    inits += bn_inits("bn", 4, rng, np_type)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["a"]),
             bn_node("a", "y", "bn")]
    return make_model(nodes, [vi("x", [16, 5], elem)], [vi("y", [16, 4], elem)], inits)


SHAPES = {"merged branches": (repvgg_block, 1), "next layer": (bn_then_linear, 1), "MatMul+Add": (matmul_add_bn, 1)}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_other_site_shapes_pass_when_honest_and_fail_on_a_bias_shift(tmp_path, capsys, shape, dtype):
    build, sites = SHAPES[shape]
    original = build(dtype)
    fused, report = bnfold.fuse_onnx(onnx.ModelProto.FromString(original.SerializeToString()))
    assert report.folded and not report.skipped
    onnx.save(original, str(tmp_path / "o.onnx"))
    onnx.save(fused, str(tmp_path / "f.onnx"))
    code, result = verify_json(capsys, tmp_path / "o.onnx", tmp_path / "f.onnx")
    assert code == 0 and result["sites_passed"] is True and len(result["sites"]) == sites
    assert not result["skipped_sites"]
    assert sorted(result["sites"][0]["folded"]) == sorted(f"BatchNormalization {b.bn!r}" for b in report.folded)
    layer_node = layer(fused, result["sites"][0]["layer"])
    bias = next(i for i in layer_node.input[2:] if i) if len(layer_node.input) > 2 else \
        next(n for n in fused.graph.node if n.op_type == "Add" and layer_node.output[0] in n.input).input[1]
    bad = onnx.ModelProto()
    bad.CopyFrom(fused)
    b = arrays(bad)[bias].copy()
    b[b.size // 2] += b.dtype.type(0.01)
    set_array(bad, bias, b)
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    code, result = verify_json(capsys, tmp_path / "o.onnx", tmp_path / "bad.onnx")
    assert code == 1 and [s["layer"] for s in result["sites"] if not s["passed"]] == [layer_node.name]
