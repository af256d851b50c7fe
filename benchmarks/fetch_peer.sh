#!/bin/sh
# Puts the peer that `make bench-gpu` runs side by side, diffusers' examples/dreambooth/train_dreambooth_lora.py,
# into the ignored folder .peer/ (another project's file: never committed), pinned by commit and sha256.
#
#   benchmarks/fetch_peer.sh /work/.mirror/huggingface+diffusers/repo   # from a git mirror (no network needed)
#   benchmarks/fetch_peer.sh                                            # from GitHub, where the network allows
#
# In a session: the `fetch` tool with source github:huggingface/diffusers answers with the mirror's git directory
# (e.g. /work/.mirror/huggingface+diffusers/repo); pass that path. Then carry .peer (and .whl, see
# benchmarks/gpu_suite.py) to the GPU machine:
#   run(command="python3 benchmarks/gpu_suite.py", carry=[".whl", ".peer"], timeout_s=600)
#
# The pin is diffusers v0.40.0, the newest release the session mirror held when this was written; the example
# asks only check_min_version("0.40.0"), so it runs on the newer diffusers the project installs (0.42.1 in
# constraints.txt). gpu_suite.py prints the file's sha256 into every report and flags any other file.
set -eu
COMMIT=d035dcd7cc7c88e0a154609b62887d50bba9fdc2   # tag v0.40.0
SHA256=97cf38b184cad2cc39e414f79b3f1a70cec3b97883350a4d2a3aa0e2533d7883
FILE=examples/dreambooth/train_dreambooth_lora.py
cd "$(dirname "$0")/.."
mkdir -p .peer
tmp=.peer/train_dreambooth_lora.py.part
if [ $# -ge 1 ]; then
    git --git-dir "$1" show "$COMMIT:$FILE" > "$tmp"
else
    curl -fsSL "https://raw.githubusercontent.com/huggingface/diffusers/$COMMIT/$FILE" -o "$tmp"
fi
got=$(sha256sum "$tmp" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
    rm -f "$tmp"
    echo "fetch_peer: $FILE at $COMMIT has sha256 $got, expected $SHA256; nothing written" >&2
    exit 1
fi
mv "$tmp" .peer/train_dreambooth_lora.py
echo "wrote .peer/train_dreambooth_lora.py (diffusers $COMMIT, sha256 $SHA256)"
