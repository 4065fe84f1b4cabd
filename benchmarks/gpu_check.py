"""GPU check of the two MLLM training stages, a few minutes on one GPU host, run by hand: never in CI (pytest reads tests/ only).

For each mode, stage 1 (tiny LM frozen, projector trained) and stage 2 (LoRA on q/k/v/o + projector) train
for a few steps on synthetic data (random unit embeddings, short LLaVA-style conversations) through
``revision.train.train``, as the stages' ``LanguageModeling`` objective; the main process loads
``accelerator.get_state_dict`` into the objective's ``rebuild()`` and saves it (as ``train_and_save`` does, so FSDP
and ZeRO are gathered), then loads the checkpoint with ``load_mllm`` and generates one answer. One line per mode
and stage: samples/s (global batch / median optimizer-step time, so the first step's warm-up and the one mid-run
``save_state`` checkpoint are left out), the peak ``torch.cuda.max_memory_allocated`` (max over ranks), and whether
the checkpoint loaded and generated. A mode whose backend is missing is skipped; the exit code is 1 if any mode
that ran failed.

Modes: ``bf16`` / ``fp32`` (one plain process), ``ddp``, ``fsdp``, ``zero2`` (``accelerate launch`` of this
script with ``configs/accelerate/{ddp,fsdp,deepspeed-zero2}.yaml``, one process per GPU), ``cpu2proc``
(``--cpu`` only: two gloo processes with ``cpu-2proc.yaml`` and ACCELERATE_USE_CPU=true). Default: bf16 ddp fsdp
zero2, or fp32 cpu2proc with ``--cpu``. The LM is a tiny random-init Llama (``revision.lm.tiny_lm``); its
tokenizer comes from the bundled 94 MB GGUF, which cannot travel to the GPU host, so save it once here:

    python benchmarks/gpu_check.py --save-tokenizer .gpu_check/tokenizer     # 3.4 MB, git-ignored

The GPU host has no pydantic (``revision.config`` needs it); carry its wheels beside the tokenizer:

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .gpu_check/wheels pydantic==2.14.3 pydantic_core==2.50.4 \\
        annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0

Copy the checkout with ``.gpu_check/`` (about 6 MB) to the GPU host; there, from the repository root:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_check/wheels/*.whl &&
    PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --tokenizer .gpu_check/tokenizer

Without a GPU: ``python benchmarks/gpu_check.py --cpu --modes fp32 cpu2proc``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from revision.checkpoints import load_mllm
from revision.config import ModelConfig
from revision.lm import bundled_gguf_path, load_gguf_tokenizer, tiny_lm
from revision.mllm import add_lora, freeze_lm, new_mllm
from revision.objectives import LanguageModeling
from revision.tracking import apply_offline_defaults
from revision.train import LoopConfig, train
from revision.training_data import EmbeddingConversations, collate
from revision.visual_input import PooledInput

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EMBED_DIM = 64
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
STAGES = {1: "LM frozen, projector", 2: "LoRA q/k/v/o + projector"}
CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": "A small red circle."}],
    [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"},
        {"from": "gpt", "value": "It is blue."},
        {"from": "human", "value": "And its shape?"},
        {"from": "gpt", "value": "A square, slightly off centre."},
    ],
]


@dataclass(frozen=True)
class Mode:
    config: str | None  # accelerate config launching the worker; None: one plain process
    precision: str
    needs: str | None = None  # a module the backend needs
    devices: tuple[str, ...] = ("cuda", "cpu")


MODES = {
    "bf16": Mode(None, "bf16"),
    "fp32": Mode(None, "no"),
    "ddp": Mode("ddp.yaml", "bf16"),
    "fsdp": Mode("fsdp.yaml", "bf16", devices=("cuda",)),  # accelerate's FSDP refuses a CPU-only host
    "zero2": Mode("deepspeed-zero2.yaml", "bf16", needs="deepspeed", devices=("cuda",)),
    "cpu2proc": Mode("cpu-2proc.yaml", "no", devices=("cpu",)),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: bf16 ddp fsdp zero2 (fp32 cpu2proc with --cpu)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (multi-process modes as gloo processes)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder from --save-tokenizer (default: the bundled GGUF)")
    parser.add_argument("--save-tokenizer", type=Path, metavar="PATH", help="save the bundled SmolLM2 tokenizer to PATH and exit")
    parser.add_argument("--num-processes", type=int, help="for the launched modes (default: the GPU count, 2 with --cpu)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per stage")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per process per step")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per mode")
    parser.add_argument("--work-dir", type=Path, help="logs and checkpoints (default: a new temporary folder)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--lm", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: samples/s comes from the time between optimizer steps")
    return args


# ------------------------------------------------------------------------- worker: both stages, one mode


def synthetic_samples(n: int) -> EmbeddingConversations:
    vectors = torch.nn.functional.normalize(torch.randn(n, EMBED_DIM, generator=torch.Generator().manual_seed(0)), dim=-1)
    return EmbeddingConversations(vectors.numpy(), [CONVERSATIONS[i % len(CONVERSATIONS)] for i in range(n)])


def stage_model(stage: int, lm_dir: Path, work_dir: Path):
    if stage == 1:
        cfg = ModelConfig(lm=str(lm_dir), visual_input="pooled", visual_tokens=4, grid=1, trust_remote_code=False,
                          system_prompt=None, seed=0)
        visual = PooledInput(EMBED_DIM, cfg.visual_tokens)
        return freeze_lm(new_mllm(lm_dir, cfg, visual, {"kind": "synthetic", "dim": EMBED_DIM}, 256, "causal"))
    return add_lora(load_mllm(work_dir / "stage1"), r=8, alpha=16, dropout=0.05, target_modules=LORA_TARGETS)


def load_and_generate(checkpoint: Path, device: str) -> str:
    try:
        answer = load_mllm(checkpoint, device).generate(torch.randn(1, EMBED_DIM), max_new_tokens=8)[0]
    except Exception as error:  # reported, not raised: the other stages and modes still run
        return f"{type(error).__name__}: {error}"
    return f"ok ({answer[:40]!r})"


def run_stage(stage: int, accelerator, args: argparse.Namespace) -> None:
    from accelerate.utils import gather_object, set_seed

    set_seed(0)
    build = functools.partial(stage_model, stage, args.lm, args.work_dir)
    objective = LanguageModeling(build(), build)
    samples = synthetic_samples(args.steps * args.batch_size * accelerator.num_processes)
    loop = LoopConfig(seed=0, epochs=1, batch_size=args.batch_size, lr=1e-3, weight_decay=0.0, warmup_ratio=0.1,
                      checkpoint_every=max(1, args.steps // 2))
    loss = lambda m, batch: m(batch)  # noqa: E731
    step_ends: list[float] = []
    record_step = lambda metrics, step: step_ends.append(time.perf_counter())  # noqa: E731
    on_gpu = accelerator.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    state_dir = args.work_dir / f"stage{stage}.state"
    model, history = train(objective, samples, collate, loss, loop, accelerator, state_dir, f"stage{stage}", record_step,
                           param_groups=objective.param_groups(loop.lr))
    peaks = gather_object([torch.cuda.max_memory_allocated(accelerator.device) if on_gpu else None])
    step_time = statistics.median(b - a for a, b in zip(step_ends, step_ends[1:]))
    state = accelerator.get_state_dict(model)  # every process takes part: sharded weights are gathered here
    if accelerator.is_main_process:
        trained = objective.rebuild()
        trained.load_state_dict(state)
        trained.save(args.work_dir / f"stage{stage}")
        result = {
            "distributed": f"{accelerator.distributed_type.value} x{accelerator.num_processes}",
            "samples_per_s": args.batch_size * accelerator.num_processes / step_time,
            "peak_gib": max(peaks) / 2**30 if on_gpu else None,
            "loss": (history[0]["loss"], history[-1]["loss"]),
            "check": load_and_generate(args.work_dir / f"stage{stage}", "cuda" if on_gpu else "cpu"),
        }
        (args.work_dir / f"stage{stage}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # stage 1's prepared model and optimizer would count in stage 2's peak


def worker(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=MODES[args.worker].precision, cpu=args.cpu)
    for stage in STAGES:
        run_stage(stage, accelerator, args)


# ------------------------------------------------------------------------- driver: one worker per mode


def skip_reason(mode: Mode, cpu: bool) -> str | None:
    if mode.needs and importlib.util.find_spec(mode.needs) is None:
        return f"{mode.needs} is not installed"
    if ("cpu" if cpu else "cuda") not in mode.devices:
        return f"runs on {' or '.join(mode.devices)} only"
    return None


def worker_command(name: str, args: argparse.Namespace, lm_dir: Path, work_dir: Path) -> list[str]:
    script = [str(Path(__file__).resolve()), "--worker", name, "--lm", str(lm_dir), "--work-dir", str(work_dir),
              "--steps", str(args.steps), "--batch-size", str(args.batch_size), *(["--cpu"] if args.cpu else [])]
    config = MODES[name].config
    if config is None:
        return [sys.executable, *script]
    launch = ["-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config)]
    return [sys.executable, *launch, "--num_processes", str(args.num_processes), *script]


def run_worker(command: list[str], log: Path, cpu: bool, timeout: int) -> str:
    """The worker's exit status as text; its output goes to ``log``."""
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "true"} if cpu else {})}
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return f"exit code {process.wait(timeout=timeout)}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # torchrun passes it on to the ranks, which run in sessions of their own
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return f"timed out after {timeout} s"


def first_error(log: Path, lines_shown: int = 8) -> list[str]:
    """The end of the first traceback in ``log`` (under torchrun the log ends with its own summary instead)."""
    lines = [re.sub(r"^\[rank\d+\]: ", "", line) for line in log.read_text().splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("Traceback")), None)
    if start is None:
        return lines[-lines_shown:]
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines) - 1)
    return lines[max(start, end + 1 - lines_shown) : end + 1]


def describe(name: str, stage: int, result: dict) -> str:
    peak = f"{result['peak_gib']:.3f} GiB (max over ranks)" if result["peak_gib"] is not None else "n/a (CPU)"
    loss = "{:.2f} -> {:.2f}".format(*result["loss"])
    return (f"{name:8} stage {stage} ({STAGES[stage]}): {result['distributed']}, {result['samples_per_s']:.1f} samples/s, "
            f"peak mem {peak}, loss {loss}, load+generate: {result['check']}")


def check_mode(name: str, args: argparse.Namespace, lm_dir: Path) -> bool:
    """Print the mode's lines; False if it ran and anything failed."""
    reason = skip_reason(MODES[name], args.cpu)
    if reason:
        print(f"{name:8} skipped: {reason}", flush=True)
        return True
    work_dir = args.work_dir / name
    work_dir.mkdir(parents=True)
    status = run_worker(worker_command(name, args, lm_dir, work_dir), work_dir / "log.txt", args.cpu, args.timeout)
    ok = status == "exit code 0"
    for stage in STAGES:
        result_file = work_dir / f"stage{stage}.json"
        if result_file.exists():
            result = json.loads(result_file.read_text())
            print(describe(name, stage, result), flush=True)
            ok &= result["check"].startswith("ok")
        else:
            error = "\n    ".join(first_error(work_dir / "log.txt"))
            print(f"{name:8} stage {stage} ({STAGES[stage]}): FAILED, worker {status}; log {work_dir / 'log.txt'}:\n    {error}")
            return False
    if status != "exit code 0":
        print(f"{name:8} FAILED after both stages, worker {status}; log {work_dir / 'log.txt'}")
    return ok


def main() -> int:
    args = parse_args()
    if args.save_tokenizer:
        load_gguf_tokenizer(bundled_gguf_path()).save_pretrained(args.save_tokenizer)
        size = sum(f.stat().st_size for f in args.save_tokenizer.iterdir()) / 2**20
        print(f"tokenizer saved to {args.save_tokenizer} ({size:.1f} MiB)")
        return 0
    if args.worker:
        worker(args)
        return 0
    apply_offline_defaults()  # inherited by the workers: nothing is ever fetched
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu to try this without a GPU")
    args.modes = args.modes or (["fp32", "cpu2proc"] if args.cpu else ["bf16", "ddp", "fsdp", "zero2"])
    args.num_processes = args.num_processes or (2 if args.cpu else torch.cuda.device_count())
    args.work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    lm_dir = tiny_lm(args.work_dir / "tiny_lm", seed=0, tokenizer_source=args.tokenizer)
    results = [check_mode(name, args, lm_dir) for name in args.modes]
    print(f"logs and checkpoints: {args.work_dir}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
