"""KubeMo's Fashion-MNIST example, ported to mip: only the import prefix changed.

The model is a small classifier of 28x28 grey photos trained on Fashion-MNIST. Each item
is one IMAGE value; the answer is a JSON object with the three most likely labels and
their probabilities.

Run it without a server (``python model.py fashion_mnist.onnx t-shirt.jpg ...``) or serve
the folder above with ``mip serve --model-repository examples/fashion_mnist/model_repository``.
"""

from typing import Tuple

from numpy import array, float32, ndarray

from mip.kubemo.adaptor.onnx import Inference
from mip.kubemo.algorithm import softmax
from mip.kubemo.serialize import Image, Json, Output

#: the model's output order
labels = ("T-Shirt", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle Boot")


class FashionMNIST(Inference):
    """Photo in, top-3 labels out."""

    def preprocess(self, inputs: Tuple[Image, ...]) -> Tuple[ndarray, ...]:
        # The network was trained on 28x28 grey images scaled to 0..1.
        img = inputs[0].decode().resize((28, 28)).convert("L")
        return array(img, dtype=float32).reshape(1, 28, 28) / 255.0,

    def postprocess(self, outputs: Tuple[ndarray, ...]) -> Tuple[Output, ...]:
        k = 3
        probabilities = softmax(outputs[0])
        top = probabilities.argsort()[-k:][::-1]
        return Json({labels[i]: probabilities[i] for i in top}),


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3:
        sys.exit("usage: python model.py fashion_mnist.onnx IMAGE [IMAGE ...]")
    model = FashionMNIST(path=sys.argv[1], input_names=("x",))
    images = sys.argv[2:]
    for path, outputs in zip(images, model(*((Image(p),) for p in images))):
        print(f"{path} => {outputs[0]}")
