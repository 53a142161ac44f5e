#!/usr/bin/env bash
# Regenerate inference_pb2.py and inference_pb2_grpc.py from inference.proto, and
# mip/serving/model_config_pb2.py from mip/serving/model_config.proto (which it imports).
#
#   python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
#       mip/frontends/oip/inference.proto
#
# then move the descriptors into a private pool: the protocol's message names
# ("inference.ModelInferRequest", "inference.ModelConfig", ...) are the same in every
# implementation, and protobuf's default pool refuses a second file defining them, so
# without this a process could not hold this server and a client such as tritonclient at
# once. model_config_pb2 creates the pool; inference_pb2 adds its file to the same pool,
# where its import is found.
set -euo pipefail
cd "$(dirname "$0")/../../.."
python -m grpc_tools.protoc -I . --python_out=. mip/serving/model_config.proto
python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
    mip/frontends/oip/inference.proto
python - <<'PY'
import pathlib
old = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
for name, pool in (("mip/serving/model_config_pb2.py", "_descriptor_pool.DescriptorPool()"),
                   ("mip/frontends/oip/inference_pb2.py",
                    "mip_dot_serving_dot_model__config__pb2.POOL")):
    path = pathlib.Path(name)
    text = path.read_text()
    assert text.count(old) == 1, "protoc output changed: update regenerate.sh"
    text = text.replace(old, "# A private pool, so that other copies of the protocol can be imported too.\n"
                             f"POOL = {pool}\n"
                             "DESCRIPTOR = POOL.AddSerializedFile(")
    path.write_text(text)
PY
