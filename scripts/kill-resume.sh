#!/usr/bin/env bash
# SIGKILLs a short training run at random moments (inside steps and inside checkpoint writes alike),
# resumes it after each kill, and checks that its final weights are bit-identical to those of an
# uninterrupted run. Usage: scripts/kill-resume.sh [KILLS=17] [XTASK=target/release/xtask]
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-17}
bin=${XTASK:-target/release/xtask}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/run.toml" <<TOML
[model]
path = "fixtures/tiny-llama"
[data]
train = "fixtures/data/prefs_standard.jsonl"
max_length = 128
[optim]
learning_rate = 1e-3
lr_scheduler_type = "cosine"
warmup_steps = 2
[train]
batch_size = 4
max_steps = 60
save_steps = 1
logging_steps = 1
progress = false
TOML
"$bin" train --config "$work/run.toml" --set "train.output_dir=\"$work/whole\"" 2> "$work/whole.log"
done_kills=0
starts=0
while :; do
    resume=()
    ls -d "$work/parts"/checkpoint-* > /dev/null 2>&1 && resume=(--resume)
    "$bin" train --config "$work/run.toml" --set "train.output_dir=\"$work/parts\"" "${resume[@]}" 2>> "$work/parts.log" &
    pid=$!
    starts=$((starts + 1))
    if [ "$done_kills" -lt "$kills" ]; then
        sleep "$(awk -v r="$RANDOM" 'BEGIN { printf "%.2f", 0.2 + 1.0 * r / 32767 }')"
        if kill -9 "$pid" 2> /dev/null; then
            wait "$pid" 2> /dev/null || true
            done_kills=$((done_kills + 1))
            continue
        fi
    fi
    wait "$pid"
    break
done
if cmp -s "$work/whole/final/model/model.safetensors" "$work/parts/final/model/model.safetensors"; then
    echo "bit-identical after $done_kills SIGKILLs ($starts starts, $(grep -c '^resumed from' "$work/parts.log") resumes, $(grep -c 'taking it over' "$work/parts.log") stale locks taken over)"
else
    echo "DIFFERENT after $done_kills SIGKILLs ($starts starts); log: $work/parts.log" >&2
    trap - EXIT
    exit 1
fi
