#!/usr/bin/env bash
# Issue #24's first "Done when" line, timed: from a checkout with `make install` done, `slimray run --recipe smollm`
# (serving on: the pipeline ends by deploying its winner) until the endpoint is up, then the official `openai` client
# asks it for a completion and a streamed chat, then Ctrl-C. Prints one line per step with the seconds since the
# start, the run's report table and the client's answers.
#
#   bench/smollm_served.sh [CHECKOUT]     # CHECKOUT: a clone with .venv installed (default: this one)
#
# The run goes to a temporary folder; set OUT to keep it (e.g. for bench/lm_engines.py --run-dir OUT/smollm).
set -euo pipefail
CHECKOUT=${1:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}
OUT=${OUT:-$(mktemp -d /tmp/slimray-smollm.XXXXXX)}
PORT=${PORT:-8766}
export PATH="$CHECKOUT/.venv/bin:$PATH"
T0=$(date +%s.%N)
step() { printf '%7.1f s  %s\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$*"; }

LOG="$OUT/run.log"
mkdir -p "$OUT"
step "slimray run --recipe smollm --out $OUT --port $PORT (log: $LOG), load average $(cut -d' ' -f1 /proc/loadavg)"
slimray run --recipe smollm --out "$OUT" --port "$PORT" > "$LOG" 2>&1 &
PID=$!
trap 'kill -INT $PID 2>/dev/null || true' EXIT
until grep -q "Ctrl-C stops the server" "$LOG"; do
  if ! kill -0 $PID 2>/dev/null; then step "slimray run exited before serving"; tail -40 "$LOG"; exit 1; fi
  sleep 5
done
step "serving (report: $OUT/smollm/report.md)"
grep -E "^(report|winner|  [a-z]|stage|\[)" "$LOG" | tail -30 || true
python - "$PORT" <<'EOF'
import sys, time
from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused", max_retries=0, timeout=300)
(model,) = [m.id for m in client.models.list().data]
t = time.perf_counter()
done = client.completions.create(model=model, prompt="The history of Paris", max_tokens=32, temperature=0)
print(f"completion ({time.perf_counter() - t:.1f} s, {done.usage.completion_tokens} tokens, "
      f"finish {done.choices[0].finish_reason}): {done.choices[0].text!r}")
t = time.perf_counter()
chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name three rivers in Europe."}],
                                             max_tokens=48, temperature=0, stream=True))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
print(f"streamed chat ({time.perf_counter() - t:.1f} s, {len(chunks)} chunks, "
      f"finish {chunks[-1].choices[0].finish_reason if chunks[-1].choices else None}): {text!r}")
assert done.usage.completion_tokens >= 1 and len(chunks) >= 2 and text
EOF
step "the openai client got a completion and a streamed chat from model served by the run"
kill -INT $PID
wait $PID || true
trap - EXIT
step "stopped; load average $(cut -d' ' -f1 /proc/loadavg)"
