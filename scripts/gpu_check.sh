#!/usr/bin/env bash
# The prepared device check (docs/gpu.md): run on a machine with at least one NVIDIA GPU, offline, on its
# preinstalled CUDA torch, in about 5 minutes (op builds included). Every check goes through
# `python -m launcher`; each prints PASS/FAIL and the whole is written as a markdown report.
#
#   scripts/gpu_check.sh [report.md]          (default: gpu_check_report.md; exit code = number of FAILs)
#
# Packages the machine lacks (hydra-core, omegaconf, deepspeed, ...) come from gpu_wheels/, built beforehand
# where there is internet by scripts/gpu_wheels.sh; they are installed into a scratch dir on PYTHONPATH,
# never into the machine's Python. PYTHON=... picks the interpreter; GPU_CHECK_DIR=... keeps the run dirs;
# GPU_CHECKS="1 3" runs only those checks (4 reuses the run of 1).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
REPORT=${1:-gpu_check_report.md}
WORK=${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}  # set but empty: CPU ranks (a dry run of this script)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
export LAUNCHER_DIST_TIMEOUT_MIN=5

# --- missing packages from gpu_wheels/ ----------------------------------------------------------------------
SITE="$WORK/site"
missing=()
for pair in hydra:hydra_core omegaconf:omegaconf antlr4:antlr4_python3_runtime deepspeed:deepspeed hjson:hjson \
            cpuinfo:py_cpuinfo msgpack:msgpack einops:einops ninja:ninja psutil:psutil tqdm:tqdm \
            safetensors:safetensors accelerate:accelerate matplotlib:matplotlib pydantic:pydantic; do
  mod=${pair%%:*}; wheel=${pair#*:}
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$wheel")
done
case " ${missing[*]:-} " in *" pydantic "*) missing+=(pydantic_core annotated_types typing_inspection) ;; esac
if [ ${#missing[@]} -gt 0 ]; then
  wheels=()
  for w in "${missing[@]}"; do
    f=$(ls gpu_wheels/"$w"-*.whl gpu_wheels/"${w//_/-}"-*.whl 2>/dev/null | head -1)
    [ -n "$f" ] && wheels+=("$f") || echo "gpu_check: no wheel for $w in gpu_wheels/ (run scripts/gpu_wheels.sh)" >&2
  done
  [ ${#wheels[@]} -gt 0 ] && "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}"
  export PATH="$SITE/bin:$PATH"
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"

want() { case " ${GPU_CHECKS:-1 2 3 4 5 6} " in *" $1 "*) return 0 ;; esac; return 1; }

# --- bookkeeping ------------------------------------------------------------------------------------------
ROWS=()
FAILS=0
T0=$(date +%s)
result() {  # result NAME PASS|FAIL DETAIL
  ROWS+=("| $1 | **$2** | $3 |")
  [ "$2" = PASS ] || FAILS=$((FAILS + 1))
  echo "$2 $1: $3"
}
launch() {  # launch NAME TIMEOUT_S overrides... -> $WORK/NAME (run dir), $WORK/NAME.log
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" -m launcher "name=$name" "hydra.run.dir=$WORK/$name" "$@" >"$WORK/$name.log" 2>&1
}
check() {  # check RUN_DIR 'python condition on rows (metrics.jsonl), st (status.json)' -> prints detail, rc
  "$PY" - "$1" "$2" <<'PY'
import json, math, sys
from pathlib import Path
d = Path(sys.argv[1])
rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()] if (d / "metrics.jsonl").is_file() else []
st = json.loads((d / "status.json").read_text()) if (d / "status.json").is_file() else {}
last = rows[-1] if rows else {}
ok = bool(eval(" ".join(line.strip() for line in sys.argv[2].splitlines())))
keys = ("step", "loss", "tokens_per_sec", "tokens_per_sec_per_gpu", "mfu", "mem_peak_gb", "mem_allocated_peak_gb",
        "mem_device_used_gb", "mem_source", "loss_scale", "skipped_steps")
print("state=%s; last: %s" % (st.get("state"), ", ".join(f"{k}={last[k]}" for k in keys if k in last)))
sys.exit(0 if ok else 1)
PY
}
plan_expect() {  # plan_expect overrides... -> the planner's numbers in the metrics' names, to set beside them
  "$PY" -m launcher.plan "$@" format=json 2>/dev/null | "$PY" -c 'import json, sys
c = json.load(sys.stdin)["current"]
keys = ("expect_mem_peak_gb", "expect_mem_device_used_gb", "tokens_per_s_per_gpu", "mfu", "total_gib")
print("plan: " + ", ".join(f"{k}={c.get(k)}" for k in keys))' || echo "plan: unavailable"
}

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
case "$GPU_NAME" in
  *H100*|*H200*|*H20*) PEAK=989 ;;
  *A100*) PEAK=312 ;;
  *) PEAK= ;;
esac
PEAK_ARG=(); [ -n "$PEAK" ] && PEAK_ARG=("hardware.peak_tflops=$PEAK")
# ~1B Llama (TinyLlama-like width, 16 layers: ~0.97B parameters) at seq 2048.
LLAMA_1B=(model.vocab_size=32000 model.hidden_size=2048 model.intermediate_size=5632 model.num_hidden_layers=16
          model.num_attention_heads=32 model.num_key_value_heads=8 model.max_position_embeddings=2048
          train.seq_len=2048 data.builtin_documents=40000)

# 1. default tiny run in bf16: loss falls, memory reported as the device's reserved memory
if want 1; then
launch bf16 300 precision=bf16 train.max_steps=30
d=$(check "$WORK/bf16" 'st.get("state") == "completed" and len(rows) >= 2 and all(math.isfinite(r["loss"]) for r in rows)
  and rows[-1]["loss"] < rows[0]["loss"] - 0.5 and last["mem_source"] == "cuda_max_memory_reserved"
  and last["mem_peak_gb"] > 0 and last["mem_device_used_gb"] > 0 and last["tokens_per_sec_per_gpu"] > 0')
[ $? -eq 0 ] && result "bf16 tiny, loss falls" PASS "$d" || result "bf16 tiny, loss falls" FAIL "$d; log $WORK/bf16.log"

fi
# 2. fp16: dynamic loss scale and skipped steps in the metrics
if want 2; then
launch fp16 240 precision=fp16 train.max_steps=30
d=$(check "$WORK/fp16" 'st.get("state") == "completed" and "loss_scale" in last and "skipped_steps" in last
  and math.isfinite(last["loss"]) and rows[-1]["loss"] < rows[0]["loss"]')
[ $? -eq 0 ] && result "fp16 tiny, loss scale" PASS "$d" || result "fp16 tiny, loss scale" FAIL "$d; log $WORK/fp16.log"

fi
# 3. SIGTERM -> checkpoint -> resume
if want 3; then
"$PY" -m launcher name=sigterm "hydra.run.dir=$WORK/sigterm" precision=bf16 train.max_steps=100000 train.log_every=5 \
  >"$WORK/sigterm.log" 2>&1 &
pid=$!
for _ in $(seq 120); do
  sleep 1
  [ -f "$WORK/sigterm/metrics.jsonl" ] && [ "$(wc -l <"$WORK/sigterm/metrics.jsonl")" -ge 2 ] && break
done
kill -TERM "$pid"; wait "$pid"
step=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('step', 0))" "$WORK/sigterm/status.json" 2>/dev/null || echo 0)
launch sigterm 240 precision=bf16 "train.max_steps=$((step + 10))" train.log_every=5
if grep -q "resuming at step $step" "$WORK/sigterm.log" && [ "$step" -gt 0 ]; then
  d=$(check "$WORK/sigterm" 'st.get("state") == "completed"'); rc=$?
  [ $rc -eq 0 ] && result "SIGTERM -> checkpoint -> resume" PASS "stopped at step $step, resumed; $d" \
    || result "SIGTERM -> checkpoint -> resume" FAIL "$d"
else
  result "SIGTERM -> checkpoint -> resume" FAIL "no resume from step $step; log $WORK/sigterm.log"
fi

fi
# 4. export the bf16 run and reload it on the GPU
if want 4; then
if timeout 180 "$PY" -m launcher.export "run_dir=$WORK/bf16" >"$WORK/export.log" 2>&1 && d=$("$PY" - "$WORK/bf16/hf" <<'PY'
import math, sys, torch
from transformers import AutoModelForCausalLM
dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the script's dry run on CPU ranks
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True, torch_dtype=torch.bfloat16).to(dev)
ids = torch.randint(0, 256, (1, 64), device=dev)
loss = float(m(input_ids=ids, labels=ids).loss)
print(f"reloaded {sum(p.numel() for p in m.parameters()):,} params, loss {loss:.3f}")
sys.exit(0 if math.isfinite(loss) else 1)
PY
); then result "export + reload" PASS "$d"; else result "export + reload" FAIL "log $WORK/export.log"; fi
rm -rf "$WORK/sigterm" "$WORK/fp16"

fi
# 5. ~1B, ZeRO-3 + activation checkpointing + CPU optimizer offload at seq 2048: measured memory vs the plan
if want 5; then
Z3=("${LLAMA_1B[@]}" precision=bf16 zero=stage3 offload=cpu activation_checkpointing=full train.micro_batch_size=1
    "${PEAK_ARG[@]}")
launch z3_offload 420 "${Z3[@]}" train.max_steps=4 train.log_every=2 train.save_every=100000
d=$(check "$WORK/z3_offload" 'st.get("state") == "completed" and math.isfinite(last["loss"]) and last["mem_peak_gb"] > 0')
ok=$?
# The worker's closing lines: run.json's plan vs each GPU's reserved (allocator) and device-used peak.
closing=$(grep '^memory: rank' "$WORK/z3_offload.log" | tr '\n' ';')
[ -n "$closing" ] || { ok=1; d="$d; no closing 'memory: rank N planned' line"; }
[ $ok -eq 0 ] && result "~1B ZeRO-3 + AC + CPU offload, seq 2048" PASS "$d; $closing $(plan_expect "${Z3[@]}")" \
  || result "~1B ZeRO-3 + AC + CPU offload, seq 2048" FAIL "$d; log $WORK/z3_offload.log"
rm -rf "$WORK/z3_offload/checkpoints"

fi
# 6. ~1B ZeRO-2 bf16: tokens/s and MFU beside the plan's prediction
if want 6; then
Z2=("${LLAMA_1B[@]}" precision=bf16 zero=stage2 train.micro_batch_size=2 "${PEAK_ARG[@]}")
launch z2_speed 360 "${Z2[@]}" train.max_steps=12 train.log_every=4 train.save_every=100000
d=$(check "$WORK/z2_speed" 'st.get("state") == "completed" and last["tokens_per_sec"] > 0 and math.isfinite(last["loss"])')
[ $? -eq 0 ] && result "~1B ZeRO-2 bf16 tokens/s, MFU" PASS "$d; $(plan_expect "${Z2[@]}")" \
  || result "~1B ZeRO-2 bf16 tokens/s, MFU" FAIL "$d; log $WORK/z2_speed.log"
rm -rf "$WORK/z2_speed/checkpoints"

fi

# --- report -------------------------------------------------------------------------------------------------
VERSIONS=$("$PY" - <<'PY'
import platform, torch
def v(m):
    try:
        return __import__(m).__version__
    except Exception:
        return "absent"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {v('transformers')}, deepspeed {v('deepspeed')}, datasets {v('datasets')}")
PY
)
VERSIONS=$(printf '%s\n' "$VERSIONS" | tail -1)  # deepspeed's import may log a line first
{
  echo "# GPU check report"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - T0)) s"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || true) (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)"
  echo "- $VERSIONS"
  echo "- from wheels: ${missing[*]:-none}"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| check | result | detail |"
  echo "|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} >"$REPORT"
echo "report: $REPORT ($FAILS failed); run dirs and logs: $WORK"
exit "$FAILS"
