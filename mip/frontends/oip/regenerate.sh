#!/usr/bin/env bash
# Regenerate inference_pb2.py and inference_pb2_grpc.py from inference.proto.
#
#   python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
#       mip/frontends/oip/inference.proto
#
# then move the descriptors into a private pool: the protocol's message names
# ("inference.ModelInferRequest", ...) are the same in every implementation, and
# protobuf's default pool refuses a second file defining them, so without this a
# process could not hold this server and a client such as tritonclient at once.
set -euo pipefail
cd "$(dirname "$0")/../../.."
python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
    mip/frontends/oip/inference.proto
python - <<'PY'
import pathlib
path = pathlib.Path("mip/frontends/oip/inference_pb2.py")
text = path.read_text()
old = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
assert text.count(old) == 1, "protoc output changed: update regenerate.sh"
text = text.replace(old, "# A private pool, so that other copies of the protocol can be imported too.\n"
                         "POOL = _descriptor_pool.DescriptorPool()\n"
                         "DESCRIPTOR = POOL.AddSerializedFile(")
path.write_text(text)
PY
