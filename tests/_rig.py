"""The test rig: tiny real models, real datasets, a real tokenizer, real Trainer runs and real torchrun jobs.

Everything is built in the test from configs and code: no hub download, ever. Importable from tests (pytest puts
this folder on ``sys.path``) and from scripts run under torchrun (``run_torchrun`` puts it on ``PYTHONPATH``).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",
}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
VOCAB_SIZE = 128
SEQ_LEN = 16

CORPUS = [
    "the run resumed from the newest verified checkpoint",
    "a flipped byte in the optimizer state is caught before loading",
    "the loss became nan at step seven and the guard stopped the run",
    "two runs on one output directory would overwrite each other",
    "the watchdog dumped every thread when the step hung",
    "lora alpha changed between the checkpoint and the new config",
    "the dataset changed size so the resume would train nothing",
    "gradient accumulation with four micro batches per optimizer step",
]


def make_tokenizer(vocab_size: int = VOCAB_SIZE) -> Any:
    """A fast BPE tokenizer trained here on a small corpus, wrapped as ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama_config(vocab_size: int = VOCAB_SIZE, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_llama(seed: int = 0, **config_overrides: Any) -> Any:
    """A randomly initialised 2-layer Llama with hidden size 32 (about 29k parameters)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**config_overrides))


def make_lm_dataset(n_rows: int = 32, seq_len: int = SEQ_LEN, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> Any:
    """A ``datasets.Dataset`` of random token rows with ``input_ids``, ``attention_mask`` and ``labels``."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        ids = [rng.randrange(4, vocab_size) for _ in range(seq_len)]
        rows.append({"input_ids": ids, "attention_mask": [1] * seq_len, "labels": list(ids)})
    return Dataset.from_list(rows)


def training_args(output_dir: str | os.PathLike[str], **overrides: Any) -> Any:
    """``TrainingArguments`` for a fast, quiet, deterministic CPU run."""
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 2,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": os.environ.get("TRAINGUARD_TEST_ON_GPU") != "1",  # tests/gpu/run_gpu_checks.sh sets it
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 0,
    }
    from _engines import from_env

    kwargs.update(from_env())  # TRAINGUARD_TEST_ENGINE=<layout>: the same scenario on a sharded engine
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(
    output_dir: str | os.PathLike[str],
    *,
    callbacks: Sequence[Any] = (),
    model: Any = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    trainer_cls: Any = None,
    **args: Any,
) -> Any:
    """A real ``Trainer`` on the tiny Llama and a small dataset (both made here unless given)."""
    from transformers import Trainer

    cls = trainer_cls or Trainer
    return cls(
        model=model if model is not None else make_tiny_llama(),
        args=training_args(output_dir, **args),
        train_dataset=train_dataset if train_dataset is not None else make_lm_dataset(),
        eval_dataset=eval_dataset,
        callbacks=list(callbacks),
    )


def run_trainer(
    output_dir: str | os.PathLike[str],
    *,
    resume_from_checkpoint: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Build a Trainer with :func:`make_trainer`, train it, and return ``(trainer, train_output)``."""
    trainer = make_trainer(output_dir, **kwargs)
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer, output


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child Python: offline, with the rig and ``src`` importable."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    paths = [str(TESTS_DIR), str(REPO_ROOT / "src")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_torchrun(
    script: str | os.PathLike[str],
    *args: str,
    nproc: int = 2,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` under ``python -m torch.distributed.run --nproc_per_node nproc`` (gloo on CPU).

    Returns the completed process (stdout and stderr captured as text); never raises on a non-zero exit.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--max-restarts=0",
        str(script),
        *args,
    ]
    # A session of its own, so that a timeout kills torchrun *and* its workers, never leaving orphans behind.
    proc = subprocess.Popen(
        cmd,
        env=subprocess_env(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_torchrun_nodes(
    script: str | os.PathLike[str],
    node_args: Sequence[Sequence[str]],
    *,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> list[subprocess.CompletedProcess[str]]:
    """Several nodes simulated on this machine: one torchrun agent per entry of ``node_args`` (one process each,
    ``--nnodes N --node_rank K``, rendezvous on 127.0.0.1), each agent running ``script`` with its own arguments
    (a node-local output folder, say). Returns one completed process per node; never raises on a non-zero exit."""
    port, nodes = free_port(), len(node_args)
    procs = []
    for node, args in enumerate(node_args):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--nnodes={nodes}",
            f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", "--max-restarts=0",
            str(script), *args,
        ]  # fmt: skip
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        procs.append(subprocess.Popen(cmd, env=subprocess_env(env), text=True, start_new_session=True, **pipes))
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(other.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, output=stdout, stderr=stderr) from None
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def run_python(
    code_or_script: str,
    *args: str,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run Python code (``-c``) or a script file in a child process with the rig importable."""
    is_script = code_or_script.endswith(".py") and Path(code_or_script).is_file()
    target = [code_or_script] if is_script else ["-c", code_or_script]
    return subprocess.run(
        [sys.executable, *target, *args],
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def mounted_tmpfs(size: str = "3m") -> Iterator[Path]:
    """Mount a real, small tmpfs (a disk that really fills up) and unmount it afterwards.

    Skips the calling test, with the reason, where mounting is not permitted (not root, no CAP_SYS_ADMIN).
    """
    import pytest

    folder = Path(tempfile.mkdtemp(prefix="trainguard-tmpfs-"))
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            folder.rmdir()


def exit_worker(code: int = 0) -> NoReturn:
    """End a torchrun worker script: wait for the other ranks, flush, then leave with ``os._exit``.

    Interpreter teardown with a live gloo process group sometimes aborts a worker in torch 2.13 ("terminate called
    without an active exception", SIGABRT) once its peer has exited, which turns a passing job into a failed one.
    The scripts have written their results by then, so skipping teardown loses nothing.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


#: A child Python that takes the run lock on ``argv[1]``, says "locked" and waits to be killed.
LOCK_HOLDER = (
    "import sys, time\n"
    "from trainguard.checks.run_lock import acquire_run_lock\n"
    "acquire_run_lock(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


@contextlib.contextmanager
def holding_run_lock(output_dir: str | os.PathLike[str], *extra_argv: str) -> Iterator[subprocess.Popen[str]]:
    """Another live process holding the run lock on ``output_dir`` (``extra_argv`` end up on its command line)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(output_dir), *extra_argv],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=60)
        assert proc.stdout is not None
        proc.stdout.close()


def make_spike_dataset(n_rows: int = 80, poison: Sequence[int] = (), seq_len: int = SEQ_LEN) -> Any:
    """Rows of a periodic token pattern the tiny model learns fast, with a row of random high tokens at each index
    in ``poison``: a poisoned batch, whose loss and gradient norm spike far above the steps before it."""
    from datasets import Dataset

    rng = random.Random(0)
    rows = []
    for i in range(n_rows):
        offset = rng.randrange(8)
        ids = [4 + (offset + j) % 8 for j in range(seq_len)]
        if i in poison:
            ids = [rng.randrange(100, VOCAB_SIZE) for _ in range(seq_len)]
        rows.append({"input_ids": ids, "attention_mask": [1] * seq_len, "labels": list(ids)})
    return Dataset.from_list(rows)
