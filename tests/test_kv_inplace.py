"""The in-place rewrite's pattern checks on hand-made graphs (the end-to-end numbers are in
``test_export.py``): what it refuses leaves the graph as it was, and a past length read with
negative Shape axes is rewired like a positive one."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from dsmoe.export.kv_inplace import KvInplaceUnsupported, attention_gqa_inplace


def _graph(bias: bool, shape_axes: tuple[int, int] | None = None) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
              helper.make_tensor_value_info("q", f, ["B", "S", 8]),
              helper.make_tensor_value_info("bias", f, ["B", 1, "S", "T"])]
    nodes = []
    for kv in ("key", "value"):
        inputs += [helper.make_tensor_value_info(f"past_key_values.0.{kv}", f, ["B", 2, "P", 4]),
                   helper.make_tensor_value_info(f"new_{kv}", f, ["B", 2, "S", 4])]
        nodes.append(helper.make_node("Concat", [f"past_key_values.0.{kv}", f"new_{kv}"], [f"present.0.{kv}"], axis=2,
                                      name=f"cat_{kv}"))
    mha_in = ["q", "present.0.key", "present.0.value"] + (["", "", "bias"] if bias else [])
    nodes.append(helper.make_node("MultiHeadAttention", mha_in, ["attn"], domain="com.microsoft", num_heads=2, name="mha"))
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("attn", "present.0.key", "present.0.value")]
    if shape_axes:
        nodes.append(helper.make_node("Shape", ["past_key_values.0.value"], ["plen"], start=shape_axes[0],
                                      end=shape_axes[1], name="plen"))
        outputs.append(helper.make_tensor_value_info("plen", TensorProto.INT64, [1]))
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs))


def test_attention_without_a_bias_is_refused_and_left_as_it_was():
    m = _graph(bias=False)
    before = m.SerializeToString()
    with pytest.raises(KvInplaceUnsupported, match="no attention_bias"):
        attention_gqa_inplace(m, 2)
    assert m.SerializeToString() == before


@pytest.mark.parametrize("axes", [(2, 3), (-2, -1)])
def test_the_past_length_is_read_from_the_mask_with_either_sign_of_axes(axes):
    m = _graph(bias=True, shape_axes=axes)
    assert attention_gqa_inplace(m, 2) == 1
    ops = {n.name: n for n in m.graph.node}
    assert "plen" not in ops and ops["plen.dsmoe_gqa"].op_type == "Identity"
    assert list(ops["plen.dsmoe_gqa"].input) == ["dsmoe_gqa.past_len"] and list(ops["plen.dsmoe_gqa"].output) == ["plen"]
    gqa = ops["mha.gqa"]
    assert gqa.op_type == "GroupQueryAttention" and list(gqa.output) == ["attn", "present.0.key", "present.0.value"]
    assert gqa.input[3:5] == ["past_key_values.0.key", "past_key_values.0.value"] and gqa.input[10] == "bias"
    assert not any(n.op_type == "Concat" for n in m.graph.node)


def test_a_past_read_by_anything_else_is_refused():
    m = _graph(bias=True, shape_axes=(0, 4))  # the whole shape: the buffer's length would leak
    with pytest.raises(KvInplaceUnsupported, match=r"past length of past_key_values\.0\.value with other axes"):
        attention_gqa_inplace(m, 2)
