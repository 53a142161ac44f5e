"""Send photos to a MIP server as KubeMo's example client does, and print the answers.

    python client.py tcp://127.0.0.1:50051 t-shirt.jpg ankle-boot.jpg

Works against ``mip serve`` and against KubeMo's own server alike: one IMAGE value per
item, one batch per call.
"""

import sys

from mip.kubemo import Client, Image

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python client.py URL IMAGE [IMAGE ...]")
    url, images = sys.argv[1], sys.argv[2:]
    with Client() as client:
        batch_output = client.inference(url, tuple((Image(path),) for path in images))
    for path, outputs in zip(images, batch_output):
        print(f"{path} => {outputs[0]}")
