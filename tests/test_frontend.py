"""Frontend: loading from every source, external data, shape fixing, canonicalisation,
PyTorch export."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxc import frontend
from onnxc.errors import ModelError, UsageError
from onnxc.execution import Runner
from onnxc.verify import compare_outputs


def _conv_model(batch="N", with_constant_node=False, init_as_input=False, opset=13):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    inits = [w]
    if with_constant_node:
        nodes.append(helper.make_node("Constant", [], ["k"], name="k",
                                      value=numpy_helper.from_array(
                                          np.full((1, 4, 1, 1), 0.5, np.float32))))
        nodes.append(helper.make_node("Mul", ["c", "k"], ["y"], name="mul"))
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])]
    if init_as_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]))
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             [batch, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model


def test_load_from_path_bytes_and_proto_agree(tmp_path):
    model = _conv_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for source in (path, str(path), path.read_bytes(), model):
        loaded = frontend.load_model(source)
        assert [n.op_type for n in loaded.graph.node] == ["Conv", "Relu"]


def test_load_never_mutates_a_given_proto():
    model = _conv_model(init_as_input=True)
    before = model.SerializeToString()
    frontend.load(model)
    assert model.SerializeToString() == before


def test_external_data_is_loaded(tmp_path):
    model = _conv_model()
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    graph = frontend.load(path)
    w = next(t for t in graph.tensors().values() if t.name == "w")
    assert w.values.shape == (4, 3, 3, 3)


def test_missing_external_data_is_a_clean_error(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(_conv_model(), path, save_as_external_data=True, location="ext.data",
              size_threshold=0)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(ModelError, match="external data"):
        frontend.load_model(path)


def test_input_shape_fixes_symbolic_batch():
    graph = frontend.load(_conv_model(), input_shapes={"x": [2, 3, 8, 8]})
    assert list(graph.gs.inputs[0].shape) == [2, 3, 8, 8]
    assert list(graph.gs.outputs[0].shape) == [2, 4, 8, 8]


def test_symbolic_batch_is_kept_without_input_shape():
    graph = frontend.load(_conv_model())
    assert not isinstance(graph.gs.inputs[0].shape[0], int)


def test_symbolic_spatial_dim_asks_for_input_shape():
    model = _conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(UsageError, match="--input-shape x:"):
        frontend.load(model)


def test_parse_input_shapes_rejects_garbage():
    assert frontend.parse_input_shapes(["x:1,3,8,8", "a:b:2"]) == {"x": [1, 3, 8, 8],
                                                                    "a:b": [2]}
    for bad in ("x", "x:1,a", "x:0,3"):
        with pytest.raises(UsageError):
            frontend.parse_input_shapes([bad])


def test_constant_nodes_become_initializers_and_outputs_match():
    model = _conv_model(with_constant_node=True)
    graph = frontend.load(model)
    assert "Constant" not in [n.op for n in graph.nodes]
    x = {"x": np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)}
    assert compare_outputs(Runner(model).run(x), Runner(graph).run(x)).max_rel < 1e-6


def test_initializers_listed_as_inputs_are_not_inputs_any_more():
    model = _conv_model(init_as_input=True)
    model.ir_version = 3
    graph = frontend.load(model)
    assert [t.name for t in graph.gs.inputs] == ["x"]


def test_old_opset_is_upgraded():
    notes = []
    model = _conv_model(opset=9)
    model.ir_version = 4
    graph = frontend.load(model, notes=notes)
    assert graph.opset >= frontend.TARGET_OPSET
    assert any("upgraded 9" in n for n in notes)


def test_shape_computing_subgraph_is_folded(resnet56_path):
    """The shared ResNet-56 computes its shortcut Pad amounts from Shape ops; the
    canonical graph has them as constants (TVM's importer needs this)."""
    graph = frontend.load(resnet56_path)
    ops = {n.op for n in graph.nodes}
    assert not ops & {"Shape", "ConstantOfShape", "Constant", "Cast"}


def test_from_torch_exports_a_runnable_model():
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5))
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    model = frontend.from_torch(net, x)
    graph = frontend.load(model)
    out = Runner(graph).run({"input": x.numpy()})[0]
    np.testing.assert_allclose(out, net(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    # exported with a dynamic batch: batch 5 runs too
    assert Runner(graph).run({"input": np.zeros((5, 3, 8, 8), np.float32)})[0].shape == (5, 5)


def test_from_torch_exports_a_transformer_encoder_despite_its_fast_path():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    net = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 8, 32)
    model = frontend.from_torch(net, x)
    assert torch.backends.mha.get_fastpath_enabled()          # restored after export
    with torch.no_grad():
        expected = net(x).numpy()
    got = Runner(model).run({"input": x.numpy()})
    assert np.abs(got[0] - expected).max() < 1e-4
