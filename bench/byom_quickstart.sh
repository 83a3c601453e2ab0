#!/usr/bin/env bash
# Times "fresh clone -> the user's own model served over HTTP", following README "Bring your own model":
# clone, `make install`, then a user project that slimray has never seen (its own nn.Module file, a teacher it
# trained itself and saved as safetensors, its data as an image folder of PNGs), `slimray init`, `slimray run`
# until the endpoint answers one request. Prints one line per step with the seconds since the start.
#
#   bench/byom_quickstart.sh [REPO]        # REPO: what to clone (default: this checkout)
#
# Needs only what `make install` needs (package registries). Leaves everything in a temporary folder, stops the
# server at the end.
set -euo pipefail
REPO=${1:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}
WORK=$(mktemp -d /tmp/slimray-quickstart.XXXXXX)
PORT=${PORT:-8765}
T0=$(date +%s.%N)
step() { printf '%7.1f s  %s\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$*"; }

git clone -q "$REPO" "$WORK/slimray"
step "cloned into $WORK/slimray"
make -C "$WORK/slimray" install > "$WORK/install.log" 2>&1
step "make install done (log: $WORK/install.log)"
export PATH="$WORK/slimray/.venv/bin:$PATH"

# --- the user's project: their model code, their trained weights, their data on disk ---
mkdir -p "$WORK/project/my_models" && cd "$WORK/project"
cat > my_models/__init__.py <<'EOF'
EOF
cat > my_models/net.py <<'EOF'
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def build(num_classes=10, width=32):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         Block(width), Block(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
EOF
python - <<'EOF'
import numpy as np, torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from my_models.net import build

d = load_digits()
x, y = d.images.astype(np.float32) / 16.0, d.target
for i, (img, label) in enumerate(zip(x, y)):
    folder = f"data/train/{label}"
    __import__("os").makedirs(folder, exist_ok=True)
    Image.fromarray((img * 255).round().astype(np.uint8), mode="L").save(f"{folder}/{i:05d}.png")
torch.manual_seed(0)
model, xt, yt = build(), torch.from_numpy(x)[:, None], torch.from_numpy(y)
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for _ in range(15):
    perm = torch.randperm(len(yt))
    for i in range(0, len(yt), 64):
        b = perm[i:i + 64]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
        opt.step()
save_file(model.state_dict(), "teacher.safetensors")
EOF
step "user project written: my_models/net.py, teacher.safetensors, data/train/<class>/*.png (1797 digits)"

# --- the README's two commands ---
slimray init --model my_models.net:build --weights teacher.safetensors --data data/train/ --kwargs '{"num_classes": 10}' \
    > "$WORK/init.log" 2>&1
step "slimray init wrote slimray.yaml"
slimray run --config slimray.yaml --port "$PORT" > "$WORK/run.log" 2>&1 &
RUN_PID=$!
trap 'kill -INT $RUN_PID 2>/dev/null; wait $RUN_PID 2>/dev/null || true' EXIT
until grep -q "^Serving http" "$WORK/run.log"; do
    kill -0 $RUN_PID 2>/dev/null || { tail -30 "$WORK/run.log"; echo "slimray run exited before serving" >&2; exit 1; }
    sleep 1
done
python - "$PORT" <<'EOF'
import json, sys, urllib.request
import numpy as np
from PIL import Image
img = np.asarray(Image.open("data/train/3/00003.png"), dtype=np.float32) / 255.0
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/predict", data=json.dumps({"inputs": [img[None].tolist()]}).encode(),
                             headers={"Content-Type": "application/json"})
print("   served answer:", json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"])
EOF
step "the served winner answered POST /v1/predict (run log: $WORK/run.log)"
