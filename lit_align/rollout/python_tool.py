"""A Python-execution tool for agentic RL: ``python(code) -> output``, for ``GRPO(tools=[...])`` (TRL's
``GRPOTrainer(tools=[...])``); in YAML ``tools: [lit_align.rollout.python_tool.python]``.

Each call writes the code to a file in a new temporary directory and runs it with ``sys.executable -I``
(isolated mode: no ``PYTHON*`` variables, no user site-packages, the script's directory not on
``sys.path``) in that directory, as a new process group, with no stdin, an environment of a few
variables (``PATH``, ``HOME`` and ``TMPDIR`` pointing at the directory, a UTF-8 locale, one BLAS thread),
a wall-clock timeout, and where the platform allows (Linux) a limit on its address space
(``resource.setrlimit``) and no core dumps. What it prints on stdout and stderr, in order, is the
result, cut to ``max_output_chars`` (its start and its end are kept: a traceback sits at the end). The
packages of the training environment can be imported (numpy, sympy, ...).

A call whose code exits non-zero (an uncaught exception: the traceback is in the message), is killed
or runs past its timeout raises :class:`PythonToolError`; lit-align's ``Toolbox`` (as TRL) turns that
into the tool message ``{'error': message}`` and counts the call as a failed one
(``tools/failure_frequency``). The whole process group is killed at the timeout and after every run,
so processes the code started do not outlive the call. Keep the tool's ``timeout`` below the
method's ``tool_call_timeout`` (10 s by default): past that, ``Toolbox`` answers with its own timeout
error and leaves the call to finish in its thread.

This is a convenience, NOT a security sandbox. The code runs as the training process's user, with its
file system, network and GPUs: it can read and write files outside its directory, open connections and
use up CPU for its timeout. Run untrusted models' code in a container or VM (or a tool that calls a
sandbox service) when that matters.

``python_tool(timeout=..., max_output_chars=..., memory_mb=...)`` makes a ``python`` tool with other
limits (same name, same schema). In YAML, point ``tools`` at a module of yours holding one::

    # my_tools.py
    from lit_align.rollout.python_tool import python_tool
    python = python_tool(timeout=20, max_output_chars=4000)
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

try:
    import resource
except ImportError:  # Windows: no limits but the timeout
    resource = None  # type: ignore[assignment]

DEFAULT_TIMEOUT = 5.0  # seconds of wall-clock time per call
DEFAULT_MAX_OUTPUT_CHARS = 2000  # tool output counts against max_completion_length: keep it short
DEFAULT_MEMORY_MB = 1024  # address space of the code's process (RLIMIT_AS); None: no limit
NO_OUTPUT = "(no output: print() the values you want to see)"
SCRIPT_NAME = "<code>"  # how tracebacks name the code, in place of the temporary file's path
_MIN_OUTPUT_CHARS = 100


class PythonToolError(RuntimeError):
    """The code failed: it exited non-zero (the message holds its traceback), was killed or timed out."""


# Runs first in the child when resource limits apply: sets them, then becomes the real interpreter
# (limits survive exec). No preexec_fn: it is not safe in a threaded process, and tools run in threads.
_BOOTSTRAP = """\
import os, resource, sys
limit = int(sys.argv[1])
try:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limit > 0:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
except (ValueError, OSError):  # a platform that refuses (macOS may): run without
    pass
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def _environment(workdir: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # dozens of calls run at once: one thread each
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if sys.platform == "win32":  # the interpreter needs these to start
        env.update({k: os.environ[k] for k in ("SYSTEMROOT", "COMSPEC") if k in os.environ})
    return env


class _Capture:
    """Reads a pipe to its end, keeping its first and last ``limit`` bytes: memory stays bounded however
    much the code prints."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.stream, self.limit = stream, limit
        self.head, self.tail = bytearray(), bytearray()
        self.total = 0

    def drain(self) -> None:
        fd = self.stream.fileno()
        try:
            while chunk := os.read(fd, 1 << 16):
                self.total += len(chunk)
                room = self.limit - len(self.head)
                if room > 0:
                    self.head += chunk[:room]
                    chunk = chunk[room:]
                self.tail += chunk
                if len(self.tail) > 2 * self.limit:
                    del self.tail[: -self.limit]
        except OSError:
            pass
        finally:
            self.stream.close()

    def text(self, max_chars: int) -> str:
        """What was read, decoded, final newlines removed, at most ``max_chars`` long: its start and end
        around a truncation note."""
        tail = bytes(self.tail[-self.limit :])
        dropped = self.total - len(self.head) - len(tail)  # bytes kept in neither
        if not dropped:
            start = end = (bytes(self.head) + tail).decode("utf-8", errors="replace").rstrip("\n")
            if len(start) <= max_chars:
                return start
            total = len(start)
        else:
            start = self.head.decode("utf-8", errors="replace")
            end = tail.decode("utf-8", errors="replace").rstrip("\n")
            total = len(start) + dropped + len(end)
        note = f"\n[... output truncated: {total:,} characters in all ...]\n"
        budget = max(max_chars - len(note), 0)
        first, last = budget // 2, budget - budget // 2
        return start[:first] + note + (end[-last:] if last else "")


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the code's process and every process it started (they share its process group)."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def run_python(
    code: str,
    timeout: float = DEFAULT_TIMEOUT,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    memory_mb: int | None = DEFAULT_MEMORY_MB,
) -> str:
    """Run ``code`` in a fresh isolated interpreter (see the module docstring) and return its output.

    Args:
        code: The program.
        timeout: Seconds of wall-clock time before the process group is killed.
        max_output_chars: Longest text returned (or put in an error message).
        memory_mb: Address-space limit of the process in MiB (where the platform allows; ``None``: none).

    Returns:
        What the code printed (stdout and stderr, final newlines removed), or ``NO_OUTPUT`` when it printed
        nothing.

    Raises:
        PythonToolError: The code exited non-zero, was killed, or ran past ``timeout``.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a string, got {type(code).__name__}")
    with tempfile.TemporaryDirectory(prefix="lit-align-python-", ignore_cleanup_errors=True) as workdir:
        script = Path(workdir) / "main.py"
        script.write_text(code, encoding="utf-8")
        command = [sys.executable, "-I", "-u", "-X", "utf8", str(script)]  # -u: stdout and stderr in order
        if resource is not None:
            limit = int(memory_mb * 2**20) if memory_mb else 0
            command = [sys.executable, "-I", "-c", _BOOTSTRAP, str(limit), *command[1:]]
        proc = subprocess.Popen(
            command, cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        capture = _Capture(proc.stdout, 4 * max_output_chars + 4)  # UTF-8: at most 4 bytes a character
        reader = threading.Thread(target=capture.drain, name="python-tool-output", daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on success: background processes the code left behind
            _kill_group(proc)
            proc.wait()
            reader.join(timeout=1.0)  # the pipe closes once every process holding it is dead
        output = capture.text(max_output_chars).replace(str(script), SCRIPT_NAME)
    if timed_out:
        message = f"Timed out after {timeout:g} s: the code was stopped."
        raise PythonToolError(message + (f" Its output until then:\n{output}" if output else ""))
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        message = f"The code was killed by {name}."
        raise PythonToolError(message + (f" Its output:\n{output}" if output else ""))
    if proc.returncode != 0:
        raise PythonToolError(f"The code failed (exit status {proc.returncode}):\n{output}".rstrip())
    return output if output.strip() else NO_OUTPUT


# The docstring below is the tool's description for the model (get_json_schema renders it into the
# chat template's tool list): it speaks to the model. For people: see the module docstring, notably
# that this is not a security sandbox.
def python(code: str) -> str:
    """Run a Python 3 program and return what it prints.

    Every call starts a new interpreter: nothing is kept between calls, so define everything the program
    uses, and print() every value you want to see. The standard library can be imported, and so can
    installed packages such as numpy or sympy. There is no input, and a program running longer than a
    few seconds is stopped.

    Args:
        code: The complete Python program to run, for example "print(17 * 23)".

    Returns:
        The program's output (stdout and stderr); if it fails, an error with its traceback.

    Raises:
        PythonToolError: The program exited with an error, was killed or timed out (lit-align's Toolbox
            answers the model with the message, as a failed call).
    """
    return run_python(code)


class PythonTool:
    """The ``python`` tool with its own limits: called by the name ``python`` and described to the model
    by the same schema; picklable. Made by :func:`python_tool`. A convenience, not a security sandbox
    (see the module docstring)."""

    def __init__(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        memory_mb: int | None = DEFAULT_MEMORY_MB,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_output_chars < _MIN_OUTPUT_CHARS:
            raise ValueError(f"max_output_chars must be at least {_MIN_OUTPUT_CHARS}, got {max_output_chars}")
        if memory_mb is not None and memory_mb <= 0:
            raise ValueError(f"memory_mb must be > 0 (or None: no limit), got {memory_mb}")
        self.timeout, self.max_output_chars, self.memory_mb = float(timeout), int(max_output_chars), memory_mb
        functools.update_wrapper(self, python)  # __name__, __doc__, annotations and signature of `python`

    def __call__(self, code: str) -> str:
        return run_python(code, self.timeout, self.max_output_chars, self.memory_mb)

    def __repr__(self) -> str:
        return (f"python_tool(timeout={self.timeout:g}, max_output_chars={self.max_output_chars}, "
                f"memory_mb={self.memory_mb})")


def python_tool(
    timeout: float = DEFAULT_TIMEOUT,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    memory_mb: int | None = DEFAULT_MEMORY_MB,
) -> PythonTool:
    """A ``python`` tool with other limits; pass it as a tool (``GRPO(tools=[python_tool(timeout=20)])``).

    Args:
        timeout: Seconds of wall-clock time a call may run (keep it below the method's ``tool_call_timeout``).
        max_output_chars: Longest output the model gets back (its start and end are kept).
        memory_mb: Address-space limit of the code's process in MiB (where the platform allows);
            ``None``: no limit.
    """
    return PythonTool(timeout, max_output_chars, memory_mb)


__all__ = ["DEFAULT_MAX_OUTPUT_CHARS", "DEFAULT_MEMORY_MB", "DEFAULT_TIMEOUT", "NO_OUTPUT", "PythonTool",
           "PythonToolError", "python", "python_tool", "run_python"]
