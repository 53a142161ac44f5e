"""mip.kubemo.serialize: KubeMo's values on the codec's values."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mip
import mip.kubemo as mk
from mip.kubemo.serialize import Dynamic, Image, Input, Json, Text, as_input

ROOT = Path(__file__).resolve().parents[2]
FASHION = ROOT / "tests" / "data" / "fashion_mnist"


def test_importing_does_not_import_pillow():
    code = ("import sys, mip.kubemo, mip.kubemo.adaptor.onnx, mip.kubemo.algorithm; "
            "print('PIL' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_top_level_names_match_kubemo():
    names = {"Inference", "Tensor", "Serial", "Input", "Output", "Dynamic", "Text", "Json",
             "Image", "JsonEncoder", "register", "IMAGE", "JSON", "TEXT", "Client", "Server",
             "InferenceHandler"}
    assert all(hasattr(mk, name) for name in names)
    assert (mk.TEXT, mk.JSON, mk.IMAGE) == (mip.TEXT, mip.JSON, mip.IMAGE)


def test_text():
    for source in ("héllo", io.StringIO("héllo"), io.BytesIO("héllo".encode())):
        value = Text(source)
        assert (value.kind, value.type) == (mk.TEXT, mip.TEXT)
        assert value.decode() == value.value == "héllo"
        assert value.encode() == value.data == "héllo".encode()
        assert value.reader.read() == value.reader.read() == "héllo".encode()
        assert repr(value) == "héllo"
        assert isinstance(value, mip.Text) and isinstance(value, mk.Serial)
    with pytest.raises(TypeError):
        Text(42)


def test_json_is_byte_identical_to_kubemo():
    kubemo = pytest.importorskip("kubemo")
    obj = {"label": np.float32(0.25), "n": np.int64(3), "v": np.arange(3), "s": "é"}
    assert Json(obj).encode() == kubemo.Json(obj).encode()
    assert Json(obj).decode() == {"label": 0.25, "n": 3, "v": [0, 1, 2], "s": "é"}
    assert Json(io.StringIO('{"a": [1]}')).decode() == {"a": [1]}


def test_image_sources(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    picture = pil.new("L", (4, 3), color=200)
    png = tmp_path / "p.png"
    picture.save(png)
    data = png.read_bytes()
    for source in (str(png), png, open(png, "rb"), io.BytesIO(data), data):
        value = Image(source)
        assert bytes(value.data) == data and value.kind == mk.IMAGE
        assert value.decode().size == (4, 3)
    assert Image(pil.open(png)).decode().getpixel((0, 0)) == 200
    with pytest.raises(TypeError):
        Image(3.5)


def test_values_go_onto_the_wire_as_they_are():
    batch = [(Text("a"), Json({"k": np.float32(1.5)}), Image(b"\x89PNG"))]
    decoded = mip.decode(mip.encode_response(batch, n_input=1)).batch[0]
    assert decoded[0].value == "a" and decoded[1].value == {"k": 1.5}
    assert bytes(decoded[2].data) == b"\x89PNG"


def test_dynamic_and_input():
    value = Dynamic(mk.JSON, io.BytesIO(b"[1, 2]"))
    assert value.decode() == [1, 2] and value.kind == mk.JSON and repr(value) == "[1, 2]"
    raw = Input(mk.TEXT, io.BytesIO(b"hi"))
    assert (raw.type, raw.data, raw.encode(), raw.decode()) == (mk.TEXT, b"hi", b"hi", "hi")
    custom = Dynamic(300, io.BytesIO(b"xyz"))
    assert (custom.kind, custom.encode()) == (300, b"xyz")


def test_as_input_turns_server_values_into_kubemo_values():
    assert as_input(mip.Text("t")).decode() == "t"
    assert as_input(mip.decode(mip.encode_request([(mip.Json({"a": 1}),)])).batch[0][0]
                    ).decode() == {"a": 1}
    assert as_input(mip.Image(b"img")).encode() == b"img"
    assert as_input("plain").decode() == "plain"
    assert as_input(b"bytes").kind == mk.IMAGE
    array = np.zeros(3)
    assert as_input(array) is array
    kept = Text("kept")
    assert as_input(kept) is kept


def test_softmax():
    from mip.kubemo.algorithm import softmax

    y = softmax(np.array([1000.0, 1000.0, 0.0]))
    np.testing.assert_allclose(y, [0.5, 0.5, 0.0], atol=1e-12)
