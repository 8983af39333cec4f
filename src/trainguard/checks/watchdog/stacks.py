"""Stack collection for hang dumps: every thread's Python stack, and native stacks from py-spy where installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import traceback

__all__ = ["native_stacks"]


def _python_stacks() -> str:
    """Every thread's Python stack with its name, main thread first (most recent call last, with source lines)."""
    frames = sys._current_frames()
    threads = {t.ident: t for t in threading.enumerate()}
    main = threading.main_thread().ident
    me = threading.get_ident()
    parts = []
    for ident in sorted(frames, key=lambda i: (i != main, i == me, i)):
        thread = threads.get(ident)
        name = thread.name if thread is not None else "<not a threading.Thread>"
        tags = []
        if ident == main:
            tags.append("main thread: runs the training loop")
        if ident == me:
            parts.append(f"Thread 0x{ident:016x} {name!r} (this watchdog thread, writing this dump)\n")
            continue
        if thread is not None and thread.daemon:
            tags.append("daemon")
        label = f" ({'; '.join(tags)})" if tags else ""
        stack = "".join(traceback.format_stack(frames[ident]))
        parts.append(f"Thread 0x{ident:016x} {name!r}{label}:\n{stack}")
    return "\n".join(parts)


def native_stacks(wanted: bool | None) -> str:
    """This process's native stacks from ``py-spy dump --native`` (falling back to ``py-spy dump``), or why not.

    ``wanted``: True (say so when py-spy is missing), None (only when py-spy is installed), False (never: "").
    """
    pyspy = shutil.which("py-spy")
    if wanted is False or (wanted is None and pyspy is None):
        return ""
    if pyspy is None:
        return "py-spy is not installed (pip install py-spy) so there are no native stacks."
    outputs = []
    for extra in (["--native"], []):
        try:
            done = subprocess.run(
                [pyspy, "dump", *extra, "--pid", str(os.getpid())],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            outputs.append(f"py-spy dump {' '.join(extra)} failed: {exc}")
            continue
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout
        outputs.append(f"py-spy dump {' '.join(extra)} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return "\n".join(outputs) + "\n(py-spy needs ptrace permission: root, CAP_SYS_PTRACE, or ptrace_scope 0)"
