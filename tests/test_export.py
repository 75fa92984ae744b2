import collections
import dataclasses
import json
import lzma
import pathlib
import re
import struct
from typing import Any, NamedTuple

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from xla_cache import reuse_identical_compiles  # noqa: F401 (autouse)

import jaxprune
from jaxprune import export


def header_of(blob: bytes) -> dict:
  payload = lzma.decompress(blob[21:])  # after magic, version, uint64 length and CRC-32
  (length,) = struct.unpack("<I", payload[:4])
  return json.loads(payload[4 : 4 + length])


def leaf_records(node):
  if node is None:
    return []
  if "leaf" in node:
    return [node["leaf"]]
  children = node.get("dict") or node.get("list") or node.get("tuple") or []
  return [r for c in children for r in leaf_records(c[1] if "dict" in node else c)]


def bits_equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  if a.dtype != b.dtype or a.shape != b.shape:
    return False
  return a.tobytes() == b.tobytes()


def sparse_matrix(key, shape, keep, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(key))
  w = jax.random.normal(k1, shape, dtype)
  return np.array(jnp.where(jax.random.uniform(k2, shape) < keep, w, 0))


def tree_fixture():
  w = sparse_matrix(0, (64, 48), 0.05)
  w[0, 0], w[0, 1] = -0.0, np.nan  # both are kept (nonzero bits)
  return {
    "dense_layer": {"kernel": sparse_matrix(1, (16, 8), 1.0), "bias": np.arange(1.0, 9.0)},
    "delta_layer": {"kernel": w},
    "bitmask_layer": {"kernel": sparse_matrix(2, (40, 30), 0.3)},
    "bf16": sparse_matrix(3, (32, 32), 0.2, jnp.bfloat16),
    "f16": np.asarray(sparse_matrix(4, (8, 4), 0.5), np.float16),
    "ints": np.array([[0, 3, 0], [-7, 0, 0]], np.int32),
    "flags": np.array([True, False, True]),
    "scalar": np.float32(2.5),
    "nested": [np.zeros((3, 3), np.float32), (np.ones(2, np.float64), None)],
    "none": None,
    "layers": {0: np.ones(3, np.float32), 1: {"kernel": np.zeros((2, 2), np.float32)}},
  }


def test_round_trip_is_bitwise_for_every_dtype_and_structure(tmp_path):
  params = tree_fixture()
  size = export.save(tmp_path / "m.jxp", params)
  loaded = export.load(tmp_path / "m.jxp")
  assert size == (tmp_path / "m.jxp").stat().st_size
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    assert bits_equal(a, b), (a, b)
  assert isinstance(loaded["nested"], list) and isinstance(loaded["nested"][1], tuple)
  assert list(loaded["layers"]) == [0, 1]  # integer keys (nnx.List) stay integers
  assert np.signbit(loaded["delta_layer"]["kernel"][0, 0])


def test_each_layer_takes_the_smallest_coding():
  params = tree_fixture()
  records = {}
  header = header_of(export.to_bytes(params))
  for name, node in header["tree"]["dict"]:
    records[name] = leaf_records(node)
  assert header["format"] == "jaxprune" and header["version"] == 3
  assert [r["coding"] for r in records["dense_layer"]] == ["dense", "dense"]
  (delta,) = records["delta_layer"]
  # 5% kept of 3072: gaps fit a byte (checked), so nnz bytes < 3072 / 8 bytes of bitmask.
  w = params["delta_layer"]["kernel"]
  index = np.flatnonzero(w.view(np.uint32) != 0)
  assert delta["coding"] == "delta" and delta["nnz"] == index.size
  assert delta["index_dtype"] == ("uint8" if np.diff(index).max() <= 256 else "uint16")
  (bitmask,) = records["bitmask_layer"]
  assert bitmask["coding"] == "bitmask"
  assert bitmask["positions"][1] == -(-1200 // 8)


def test_masks_give_the_positions_and_pruned_values_must_be_zero(tmp_path):
  params = {"w": jax.random.normal(jax.random.key(0), (32, 16)), "b": jnp.ones(16)}
  masks = jaxprune.magnitude(0.8).masks(params)
  pruned = jaxprune.apply_mask(params, masks)
  export.save(tmp_path / "m.jxp", pruned, masks)
  loaded = export.load(tmp_path / "m.jxp")
  assert bits_equal(loaded["w"], pruned["w"]) and bits_equal(loaded["b"], pruned["b"])
  with pytest.raises(ValueError, match="'w' has nonzero values where its mask prunes"):
    export.save(tmp_path / "bad.jxp", params, masks)
  with pytest.raises(ValueError, match="quantize must be None, 'int8' or 'shared'"):
    export.to_bytes(pruned, quantize="int4")


def test_int8_loads_the_dequantized_values_and_zeros_stay_zero(tmp_path):
  params = {
    "fc": {
      "kernel": sparse_matrix(0, (64, 32), 0.1),
      "bias": np.linspace(-1, 1, 32, dtype=np.float32),
    },
    "conv": {"kernel": sparse_matrix(1, (3, 3, 4, 8), 0.5)},
  }
  export.save(tmp_path / "q.jxp", params, quantize="int8")
  loaded = export.load(tmp_path / "q.jxp")
  for layer in ("fc", "conv"):
    w = params[layer]["kernel"]
    scale = np.abs(w).reshape(-1, w.shape[-1]).max(0) / 127  # numpy reference
    expected = np.clip(np.round(w / scale), -127, 127).astype(np.int8).astype(np.float32) * scale
    np.testing.assert_allclose(loaded[layer]["kernel"], expected, rtol=1e-6, atol=0)
    assert bits_equal(
      loaded[layer]["kernel"], jaxprune.dequantize(jaxprune.quantize(params))[layer]["kernel"]
    )
    assert ((loaded[layer]["kernel"] == 0) == (w == 0)).all()
  assert bits_equal(loaded["fc"]["bias"], params["fc"]["bias"])  # biases are not quantized


def test_empty_kernels_round_trip_in_every_mode():
  params = {"w": np.zeros((0, 4), np.float32), "conv": np.zeros((3, 0, 2, 5), np.float16)}
  for quantize in (None, "int8", "shared"):
    loaded = export.from_bytes(export.to_bytes(params, quantize=quantize))
    assert tree_bits_equal(loaded, params), quantize


def kmeans_reference(v, bits, iterations):
  """Plain-loop 1-D k-means: linear init, nearest centroid (tie: lower), empty keeps."""
  v = [float(x) for x in v]
  k = min(2**bits, len(v))
  lo, hi = min(v), max(v)
  c = sorted(set(lo + (hi - lo) * i / (k - 1) for i in range(k))) if k > 1 else [lo]

  def assign(x):
    return min(range(len(c)), key=lambda j: (abs(x - c[j]), j))

  for _ in range(iterations + 1):
    groups = [[x for x in v if assign(x) == j] for j in range(len(c))]
    c = [sum(g) / len(g) if g else c[j] for j, g in enumerate(groups)]
  return [c[j] for j in range(len(c)) if groups[j]], groups


def test_kmeans_matches_a_plain_loop_reference():
  v = np.random.default_rng(0).standard_normal(200)
  v = v[np.abs(v) > 0.5]
  codebook, index = export.kmeans_1d(v, bits=3, iterations=7)
  expected, groups = kmeans_reference(v, 3, 7)
  np.testing.assert_allclose(codebook, np.asarray(expected, np.float32), rtol=1e-6)
  got = [sorted(v[index == j].tolist()) for j in range(codebook.size)]
  assert got == [sorted(g) for g in groups if g]
  assert index.dtype == np.uint8 and codebook.dtype == np.float32


def test_shared_loads_exactly_the_centroids_and_pruned_positions_stay_zero(tmp_path):
  params = {
    "fc": {"kernel": sparse_matrix(0, (64, 32), 0.1), "bias": np.linspace(-1, 1, 32)},
    "conv": {"kernel": sparse_matrix(1, (3, 3, 4, 8), 0.5)},
    "bf16": {"kernel": sparse_matrix(2, (32, 16), 0.3, jnp.bfloat16)},
  }
  for bits in (1, 3, 5, 8):
    path = tmp_path / f"s{bits}.jxp"
    export.save(path, params, quantize="shared", bits=bits)
    loaded = export.load(path)
    records = {r["shape"][0]: r for r in leaf_records(header_of(path.read_bytes())["tree"])}
    for layer in ("fc", "conv", "bf16"):
      w = np.asarray(params[layer]["kernel"])
      kept = w != 0
      codebook, index = export.kmeans_1d(w[kept], bits)
      assert codebook.size <= 2**bits
      expected = np.zeros(w.shape, np.float32)
      expected[kept] = codebook[index]
      assert bits_equal(loaded[layer]["kernel"], expected.astype(w.dtype))
      assert (loaded[layer]["kernel"][~kept] == 0).all()
      assert (loaded[layer]["kernel"][kept] != 0).all()  # no kept weight maps to zero
      assert set(np.unique(loaded[layer]["kernel"][kept]).tolist()) <= set(
        codebook.astype(w.dtype).tolist()
      )
    assert records[3]["bits"] == bits and records[3]["coding"] != "dense"
    assert bits_equal(loaded["fc"]["bias"], params["fc"]["bias"])  # biases stay exact
  assert path.read_bytes()[8] == export.to_bytes(params)[8] == 3  # every file is version 3


def test_shared_is_deterministic_and_smaller_than_int8():
  w = {"kernel": sparse_matrix(0, (300, 100), 0.08), "bias": np.zeros(100, np.float32)}
  blobs = [export.to_bytes(w, quantize="shared") for _ in range(2)]
  assert blobs[0] == blobs[1]
  assert blobs[0] == export.to_bytes(w, quantize="shared", bits=5)  # the default
  s = export.sizes(w)
  assert s["jaxprune shared 5-bit"] == len(blobs[0]) < s["jaxprune int8"]
  assert len(export.to_bytes(w, quantize="shared", bits=2)) < len(blobs[0])


@pytest.mark.parametrize("bits", [0, 9, -1, 5.0, True, "5"])
def test_shared_bits_out_of_range_is_a_clear_error(bits):
  w = {"kernel": sparse_matrix(0, (8, 4), 0.5)}
  with pytest.raises(ValueError, match="bits must be an integer from 1 to 8"):
    export.to_bytes(w, quantize="shared", bits=bits)
  with pytest.raises(ValueError, match="bits must be an integer from 1 to 8"):
    export.kmeans_1d([1.0, 2.0], bits=bits)
  with pytest.raises(ValueError, match="bits=5 is for quantize='shared'"):
    export.to_bytes(w, quantize="int8", bits=5)


def test_shared_refuses_nan_and_names_the_leaf():
  w = sparse_matrix(0, (8, 4), 0.5)
  w[0, 0] = np.nan
  with pytest.raises(ValueError, match="'layer/kernel'.*finite"):
    export.to_bytes({"layer": {"kernel": w}}, quantize="shared")


small_float = st.floats(-4, 4, width=32).filter(lambda x: x != 0)


@settings(max_examples=60, deadline=None)
@given(
  values=hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
    elements=st.one_of(st.just(np.float32(0)), st.sampled_from([np.float32(0.5)]), small_float),
  ),
  bits=st.integers(1, 8),
)
def test_shared_round_trip_property(values, bits):
  """Ties (repeated values), one element, all-zero layers: centroids back, zeros exact."""
  blob = export.to_bytes({"w": values}, quantize="shared", bits=bits)
  loaded = export.from_bytes(blob)["w"]
  kept = values != 0
  codebook, index = export.kmeans_1d(values[kept], bits)
  assert codebook.size <= min(2**bits, len(np.unique(values[kept])))
  assert (loaded[~kept] == 0).all()
  assert bits_equal(loaded[kept], codebook[index])
  if kept.any():
    assert codebook.min() >= values[kept].min() and codebook.max() <= values[kept].max()
  if np.unique(values[kept]).size == 1:  # one distinct value: its own centroid, exact
    assert bits_equal(loaded, values)
  assert export.to_bytes({"w": values}, quantize="shared", bits=bits) == blob


def test_pruned_file_is_smaller_than_npz_gzip_and_int8_smaller_still():
  w = {"kernel": sparse_matrix(0, (300, 100), 0.08), "bias": np.zeros(100, np.float32)}
  s = export.sizes(w)
  assert s["dense float32"] == 30100 * 4
  assert s["jaxprune int8"] < s["jaxprune float32"] < s[".npz + gzip"] < s["dense float32"]


def test_file_is_json_and_raw_arrays_not_pickle(tmp_path):
  export.save(tmp_path / "m.jxp", {"w": np.ones((2, 2), np.float32)})
  blob = (tmp_path / "m.jxp").read_bytes()
  assert blob[:8] == b"JAXPRUNE" and blob[8] == 3
  assert b"pickle" not in lzma.decompress(blob[21:])
  with pytest.raises(ValueError, match="not a jaxprune file"):
    export.from_bytes(b"PK\x03\x04" + blob[4:])


def test_unsupported_structures_are_named():
  class Box:
    pass

  with pytest.raises(TypeError, match=r"cannot store Box at 'a/0'.*to_pure_dict"):
    export.to_bytes({"a": [Box()]})
  with pytest.raises(TypeError, match="keys other than strings and integers"):
    export.to_bytes({1.5: np.zeros(2)})


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(4)(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("jit", [False, True])
def test_sparse_forward_equals_the_masked_dense_model(jit):
  model = MLP()
  x = jax.random.normal(jax.random.key(1), (5, 24))
  params = model.init(jax.random.key(0), x)["params"]
  masks = jaxprune.magnitude(0.9).masks(params)
  dense = model.apply({"params": jaxprune.apply_mask(params, masks)}, x)
  sparse_params = export.to_sparse(params, masks)
  kernel = sparse_params["Dense_0"]["kernel"]
  assert type(kernel).__name__ == "BCOO"
  assert kernel.nse == int(masks["Dense_0"]["kernel"].sum())
  apply = export.sparse_apply(lambda p, x: model.apply({"params": p}, x))
  out = (jax.jit(apply) if jit else apply)(sparse_params, x)
  np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)


def test_bcsr_export_round_trips_and_the_forward_asks_for_bcoo():
  params = {"kernel": sparse_matrix(0, (12, 8), 0.3), "bias": np.zeros(8, np.float32)}
  sparse_params = export.to_sparse(params, format="bcsr")
  assert type(sparse_params["kernel"]).__name__ == "BCSR"
  assert bits_equal(sparse_params["kernel"].todense(), params["kernel"])
  apply = export.sparse_apply(lambda p, x: x @ p["kernel"] + p["bias"])
  with pytest.raises(TypeError, match="'kernel' is BCSR.*format='bcoo'"):
    apply(sparse_params, jnp.ones((2, 12)))


def test_conv_kernels_stay_dense_and_the_forward_still_matches():
  model = CNN()
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 2))
  params = model.init(jax.random.key(0), x)["params"]
  masks = jaxprune.magnitude(0.5).masks(params)
  sparse_params = export.to_sparse(params, masks)
  assert isinstance(sparse_params["Conv_0"]["kernel"], jax.Array)
  out = export.sparse_apply(lambda p, x: model.apply({"params": p}, x))(sparse_params, x)
  dense = model.apply({"params": jaxprune.apply_mask(params, masks)}, x)
  np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)
  with pytest.raises(NotImplementedError, match=r"'Conv_0/kernel' has shape \(3, 3, 2, 4\)"):
    export.to_sparse(params, where="Conv_0/kernel")
  with pytest.raises(ValueError, match="format must be one of"):
    export.to_sparse(params, format="csr")


def nm_masked(shape, key=0):
  w = jax.random.normal(jax.random.key(key), shape)
  mask = jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4)).masks({"w": w})["w"]
  return np.asarray(w * mask), np.asarray(mask)


@pytest.mark.parametrize("shape", [(32, 6), (3, 3, 8, 5)])
def test_nm_pack_layout_and_exact_round_trip(shape):
  w, mask = nm_masked(shape)
  packed = export.nm_pack(w, mask=mask)
  k, out = int(np.prod(shape[:-1])), shape[-1]
  assert packed.values.shape == (out, k // 2) and packed.metadata.shape == (out, k // 8)
  a = w.reshape(k, out).T  # the hardware's sparse operand: [out, K], contraction minor
  m_a = mask.reshape(k, out).T
  for row in range(out):  # numpy reference: kept values of each row, in order
    np.testing.assert_array_equal(packed.values[row], a[row][m_a[row]])
  assert bits_equal(export.nm_unpack(packed), w)
  assert packed.values.nbytes == w.nbytes // 2


def test_nm_metadata_is_the_2_bit_sparse_mma_layout():
  w, mask = nm_masked((64, 3), key=3)
  packed = export.nm_pack(w, mask=mask)
  # JAX's former nm_pack: one uint16 per 16 inputs, index j of group g at bits 2 * (2g + j).
  m_a = mask.reshape(64, 3).T
  for row in range(3):
    positions = np.flatnonzero(m_a[row]) % 4
    expected = [
      sum(int(p) << (2 * i) for i, p in enumerate(positions[8 * word : 8 * word + 8]))
      for word in range(64 // 16)
    ]
    assert packed.metadata.view(np.uint16)[row].tolist() == expected


def test_nm_pack_fills_short_groups_and_refuses_dense_ones():
  w = np.zeros((8, 2), np.float32)
  w[1, 0], w[6, 1], w[7, 1] = 3.0, -1.0, 2.0
  packed = export.nm_pack(w)
  assert bits_equal(export.nm_unpack(packed), w)
  w[2, 0] = w[3, 0] = 1.0
  with pytest.raises(
    ValueError, match=r"'kernel' is not 2:4 sparse: 1 groups .* output 0, inputs 0..3 keep 3"
  ):
    export.nm_pack(w)
  with pytest.raises(ValueError, match="must be a multiple of 4"):
    export.nm_pack(np.ones((6, 2)))
  for shape in ((8,), ()):  # a bias: no input axis to speak of (said 'shape[-2]')
    with pytest.raises(ValueError, match=r"N:M packs a kernel \(ndim >= 2"):
      export.nm_pack(np.ones(shape, np.float32))


def test_nm_matmul_says_what_this_jax_lacks():
  w, mask = nm_masked((16, 4))
  packed = export.nm_pack(w, mask=mask)
  if export.nm_matmul_available():
    pytest.skip("this JAX ships jax.experimental.sparse.nm")
  with pytest.raises(NotImplementedError, match=rf"JAX {jax.__version__} has no sparse N:M matmul"):
    export.nm_matmul(jnp.ones((2, 16)), packed)


DATA = pathlib.Path(__file__).resolve().parent / "data"


def old_params():
  """The tree in tests/data/export_v*.jxp (written by jaxprune 0.1.0 at commit 07fac42)."""
  rng = np.random.default_rng(20)
  w = rng.standard_normal((16, 8)).astype(np.float32)
  w[rng.random((16, 8)) > 0.3] = 0
  return {
    "fc": {"kernel": w, "bias": rng.standard_normal(8).astype(np.float32)},
    "steps": np.array([3, 0, 7], np.int32),
    "blocks": [np.zeros((2, 2), np.float16), (np.ones(3), None)],
  }


def old_expected(name: str):
  params = old_params()
  w = params["fc"]["kernel"]
  if name == "export_v1_int8.jxp":
    params["fc"]["kernel"] = np.asarray(jaxprune.dequantize(jaxprune.quantize({"w": w}))["w"])
  elif name == "export_v2_shared3.jxp":
    codebook, index = export.kmeans_1d(w[w != 0], bits=3)
    params["fc"]["kernel"] = np.zeros_like(w)
    params["fc"]["kernel"][w != 0] = codebook[index]
  return params


def tree_bits_equal(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
    bits_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


OLD_FILES = ["export_v1.jxp", "export_v1_int8.jxp", "export_v2_shared3.jxp"]


@pytest.mark.parametrize("name", OLD_FILES)
def test_version_1_and_2_files_still_load(name):
  blob = (DATA / name).read_bytes()
  assert blob[8] == (2 if "v2" in name else 1)
  assert tree_bits_equal(export.load(DATA / name), old_expected(name))


# What a damaged file may raise: a named damage, or (the magic or version byte changed) a
# file that is not jaxprune's / of another version. Never other errors, never wrong arrays.
DAMAGE = r"is damaged \((truncated at byte \d+|checksum mismatch|corrupt data|its JAXPRUNE)"
NOT_OURS = r"is not a jaxprune file|has file version \d+; this jaxprune reads versions 1, 2, 3"


def load_or_error(blob: bytes):
  try:
    return export.from_bytes(blob)
  except ValueError as e:
    assert re.search(f"the data ({DAMAGE}|{NOT_OURS})", str(e)), str(e)
    return e


@pytest.mark.parametrize("name", [None, *OLD_FILES])
def test_every_cut_and_every_flipped_byte_is_an_error_or_the_exact_arrays(name):
  """Each prefix of the file, and the file with each byte changed (three ways)."""
  blob = export.to_bytes(old_params()) if name is None else (DATA / name).read_bytes()
  expected = old_params() if name is None else old_expected(name)
  for cut in range(len(blob)):
    error = load_or_error(blob[:cut])
    assert isinstance(error, export.DamagedFileError), (cut, error)
    assert f"truncated at byte {cut}" in str(error) or "corrupt data" in str(error)
  rng = np.random.default_rng(0)
  for position in range(len(blob)):
    for flip in (0xFF, 1 << int(rng.integers(8)), int(rng.integers(1, 256))):
      damaged = bytearray(blob)
      damaged[position] ^= flip
      loaded = load_or_error(bytes(damaged))
      assert isinstance(loaded, ValueError) or tree_bits_equal(loaded, expected), position
  if name is None:  # version 3: the CRC catches every change after the version byte
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 4
    with pytest.raises(export.DamagedFileError, match="checksum mismatch"):
      export.from_bytes(bytes(damaged))


def test_a_damaged_file_names_itself(tmp_path):
  path = tmp_path / "m.jxp"
  export.save(path, old_params())
  blob = path.read_bytes()
  for cut, message in [
    (0, "truncated at byte 0"),
    (8, "truncated at byte 8"),
    (100, "truncated at byte 100 of"),
  ]:
    path.write_bytes(blob[:cut])
    with pytest.raises(
      export.DamagedFileError, match=f"file '{re.escape(str(path))}' is damaged \\({message}"
    ):
      export.load(path)
  path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
  with pytest.raises(
    export.DamagedFileError,
    match=f"file '{re.escape(str(path))}' is damaged \\(checksum mismatch\\)",
  ):
    export.load(path)
  v1 = (DATA / "export_v1.jxp").read_bytes()
  path.write_bytes(v1[:300])
  with pytest.raises(export.DamagedFileError, match=r"is damaged \(truncated at byte 300\)"):
    export.load(path)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_int8_refuses_nan_and_inf_and_names_the_leaf_and_channel(bad):
  w = sparse_matrix(0, (8, 4), 0.5)
  w[3, 2] = bad
  with pytest.raises(
    ValueError, match=r"'layer/kernel' has (inf|-inf|nan) at \[3, 2\], in output channel 2 .*finite"
  ):
    export.to_bytes({"layer": {"kernel": w}}, quantize="int8")
  with pytest.raises(ValueError, match="'layer/kernel'.*finite"):
    export.to_bytes({"layer": {"kernel": w}}, quantize="shared")
  export.to_bytes({"layer": {"kernel": w}})  # stored as it is without quantization


def test_float64_weights_beyond_float32_are_refused_when_quantized():
  """int8 scales and shared codebooks are float32: 1e300 loaded as NaN / inf, silently."""
  w = np.array([[1e300, 1.0], [2.0, -3.0]])
  with pytest.raises(ValueError, match=r"'fc/kernel' has 1e\+300 at \[0, 0\], beyond float32"):
    export.to_bytes({"fc": {"kernel": w}}, quantize="int8")
  with pytest.raises(ValueError, match=r"'fc/kernel'.*float32 centroids; found 1e\+300"):
    export.to_bytes({"fc": {"kernel": w}}, quantize="shared")
  assert bits_equal(export.from_bytes(export.to_bytes({"w": w}))["w"], w)  # unquantized: exact
  w[0, 0] = 1e30  # in range: float64 leaves still quantize, and load as float64
  loaded = export.from_bytes(export.to_bytes({"w": w}, quantize="int8"))["w"]
  scale = (np.abs(w).max(0) / 127).astype(np.float32)
  assert loaded.dtype == np.float64 and np.isfinite(loaded).all()
  assert (np.abs(loaded - w) <= scale.astype(np.float64) * 0.5 * (1 + 1e-6)).all()


def test_big_endian_arrays_load_with_their_values():
  """A '>f4' / '>i4' array (np.load of a big-endian .npy) had its bytes stored as they are
  and read back as little-endian: 1.5 loaded as 6.9e-41, silently."""
  w = np.array([[1.5, 0.0], [-2.0, 3.25]], ">f4")
  i = np.array([1, 0, 300], ">i4")
  for quantize in (None, "int8", "shared"):
    loaded = export.from_bytes(export.to_bytes({"w": w, "i": i}, quantize=quantize))
    assert bits_equal(loaded["i"], i.astype(np.int32))
    assert loaded["w"].dtype == np.float32
    if quantize is None:
      assert bits_equal(loaded["w"], w.astype(np.float32))
    else:  # three distinct values: shared gives them exactly; int8 within half a step
      np.testing.assert_allclose(loaded["w"], w, atol=np.abs(w).max() / 127 / 2)


class Pair(NamedTuple):
  w: Any
  b: Any


@pytest.mark.parametrize(
  "node, kind",
  [
    (Pair(np.ones(2), np.zeros(2)), r"Pair, which would load as a plain tuple"),
    (collections.OrderedDict(w=np.ones(2)), r"OrderedDict, which would load as a plain dict"),
    (flax.core.FrozenDict(w=np.ones(2)), r"FrozenDict, which would load as a plain dict"),
  ],
)
def test_containers_that_would_load_as_another_structure_are_refused(node, kind):
  with pytest.raises(TypeError, match=f"'layers/0' is a {kind}"):
    export.to_bytes({"layers": [node]})
  pair = Pair(np.ones(2, np.float32), np.zeros(2, np.float32))
  loaded = export.from_bytes(export.to_bytes({"layers": [pair._asdict(), tuple(pair)]}))
  assert tree_bits_equal(loaded, {"layers": [pair._asdict(), tuple(pair)]})


def test_prng_keys_and_non_numeric_arrays_are_named():
  with pytest.raises(TypeError, match=r"'state/rng' is a PRNG key array \(key<fry>\).*key_data"):
    export.to_bytes({"state": {"rng": jax.random.key(0), "w": np.ones(2)}})
  with pytest.raises(TypeError, match=r"'names' has dtype <U1; the file holds arrays of"):
    export.to_bytes({"names": np.array(["a", "b"])})
  with pytest.raises(TypeError, match=r"'o' has dtype object"):
    export.to_bytes({"o": np.array([None, 1], dtype=object)})
  c = np.array([1 + 2j, 0, -3j], np.complex128)  # 16-byte elements are stored too
  assert bits_equal(export.from_bytes(export.to_bytes({"c": c}))["c"], c)


def test_negative_zeros_where_the_mask_prunes_are_zeros(tmp_path):
  w = np.array([[0.5, -0.25], [-0.75, 1.0]], np.float32)
  mask = np.array([[True, False], [False, True]])
  pruned = w * mask  # -0.0 at [0, 1] and [1, 0]
  assert np.signbit(pruned[~mask]).all()
  export.save(tmp_path / "m.jxp", {"w": pruned}, {"w": mask})
  loaded = export.load(tmp_path / "m.jxp")["w"]
  assert bits_equal(loaded, np.where(mask, w, np.float32(0)))
  bad = pruned.copy()
  bad[0, 1] = np.nan
  with pytest.raises(ValueError, match="'w' has nonzero values where its mask prunes"):
    export.to_bytes({"w": bad}, {"w": mask})
  # a leaf that keeps nearly everything is stored dense: its -0.0 loaded as -0.0
  w = -np.arange(1, 65, dtype=np.float32).reshape(8, 8)
  mask = np.ones((8, 8), bool)
  mask[0, 0] = False
  blob = export.to_bytes({"w": w * mask}, {"w": mask})
  assert [r["coding"] for r in leaf_records(header_of(blob)["tree"])] == ["dense"]
  assert bits_equal(export.from_bytes(blob)["w"], np.where(mask, w, np.float32(0)))


def test_masks_apply_by_path_whatever_their_containers():
  """A mask dict keyed "0" for params keyed 0, nested masks for a key "a/b", an nnx.State
  of masks for nnx.to_pure_dict params: the masks were looked up by the params' own keys,
  found nothing, and were ignored (unpruned values saved, no error) or crashed."""
  w = np.array([[0.5, -1.5], [2.0, 0.25]], np.float32)
  mask = np.array([[True, False], [False, True]])
  pruned = np.where(mask, w, np.float32(0))
  for params, masks in [
    ({"layers": {0: {"kernel": w}}}, {"layers": {"0": {"kernel": mask}}}),
    ({"a/b": w}, {"a": {"b": mask}}),
  ]:
    with pytest.raises(ValueError, match="has nonzero values where its mask prunes"):
      export.to_bytes(params, masks)
  loaded = export.from_bytes(export.to_bytes({"a/b": pruned}, {"a": {"b": mask}}))
  assert bits_equal(loaded["a/b"], pruned)

  class Net(nnx.Module):
    def __init__(self):
      self.layers = nnx.List([nnx.Linear(8, 4, rngs=nnx.Rngs(i)) for i in range(2)])

  state = nnx.state(Net(), nnx.Param)
  masks = jaxprune.magnitude(0.5).masks(state)
  params = nnx.to_pure_dict(state)
  plain_masks = nnx.to_pure_dict(masks)
  expected = {
    "layers": {
      i: {
        "bias": np.asarray(layer["bias"]),
        "kernel": np.where(plain_masks["layers"][i]["kernel"], layer["kernel"], np.float32(0)),
      }
      for i, layer in params["layers"].items()
    }
  }
  loaded = export.from_bytes(export.to_bytes(expected, masks))
  assert tree_bits_equal(loaded, expected)
  with pytest.raises(ValueError, match="'layers/0/kernel' has nonzero values where its mask"):
    export.to_bytes(params, masks)


@pytest.mark.parametrize(
  "n, m, error, message",
  [
    (3, 2, ValueError, r"1 <= n <= m <= 256; got n=3, m=2"),
    (0, 4, ValueError, r"got n=0, m=4"),
    (2, 0, ValueError, r"got n=2, m=0"),
    (2.0, 4, TypeError, r"n and m must be integers, got n=2.0, m=4"),
    (True, 4, TypeError, r"n and m must be integers"),
  ],
)
def test_nm_pack_names_a_bad_pattern(n, m, error, message):
  w, mask = nm_numpy(8, 2, 2, 4)
  with pytest.raises(error, match=f"nm_pack: .*{message}"):
    export.nm_pack(w, n=n, m=m, mask=mask)


def nm_numpy(k, out, n, m, seed=0):
  """A [k, out] kernel keeping the n largest |w| of every m consecutive inputs (numpy)."""
  w = np.random.default_rng(seed).standard_normal((k, out)).astype(np.float32)
  groups = np.abs(w).T.reshape(out, k // m, m)
  rank = np.argsort(np.argsort(-groups, axis=-1, kind="stable"), axis=-1, kind="stable")
  mask = (rank < n).reshape(out, k).T
  return np.where(mask, w, np.float32(0)), mask


def test_nm_pack_and_unpack_name_bad_inputs():
  w, mask = nm_numpy(8, 2, 2, 4)
  with pytest.raises(ValueError, match=r"the mask of 'fc' has shape \(2, 8\), the kernel \(8, 2\)"):
    export.nm_pack(w, mask=mask.T, name="fc")
  with pytest.raises(
    TypeError, match="nm_unpack: takes the NMPacked that nm_pack returns, got ndarray"
  ):
    export.nm_unpack(w)
  packed = export.nm_pack(w, mask=mask)
  wrong = dataclasses.replace(packed, shape=(16, 2))
  with pytest.raises(
    ValueError, match=r"values \(2, 4\) and metadata \(2, 1\) do not fit a 2:4 kernel"
  ):
    export.nm_unpack(wrong)
  doubled = dataclasses.replace(packed, metadata=np.zeros_like(packed.metadata))  # position 0 twice
  with pytest.raises(ValueError, match="not 2 increasing indices below 4"):
    export.nm_unpack(doubled)
  for n, m in [(1, 2), (3, 4), (4, 4), (2, 8)]:  # other valid patterns round trip
    sparse, kept = nm_numpy(16, 3, n, m, seed=n * m)
    packed = export.nm_pack(sparse, n, m, mask=kept)
    assert packed.values.shape == (3, 16 * n // m)
    assert bits_equal(export.nm_unpack(packed), sparse)


@pytest.mark.parametrize("shape", [(8, 0), (3, 3, 8, 0), (0, 4)])
def test_nm_pack_round_trips_kernels_with_no_outputs_or_no_inputs(shape):
  # a layer shrunk to no outputs: every reshape(-1, 0) raised "cannot reshape array of size 0"
  w = np.zeros(shape, np.float32)
  k, out = int(np.prod(shape[:-1])), shape[-1]
  for mask in (None, np.zeros(shape, bool)):
    packed = export.nm_pack(w, mask=mask)
    assert packed.values.shape == (out, k // 2)
    assert packed.metadata.shape == (out, -(-(k // 2) // 4))
    assert bits_equal(export.nm_unpack(packed), w)
