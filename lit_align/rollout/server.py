"""``lit-align serve``: a generation server for trainers on other devices (TRL's ``trl vllm-serve``).

The server holds its own copy of the policy (vLLM when installed on a CUDA machine, else the
HF engine of :mod:`lit_align.rollout.engines`); the trainer samples it through
:class:`lit_align.rollout.server_engine.ServerEngine` and pushes its weights after each
optimizer step. JSON over HTTP (stdlib ``http.server``), one request served at a time (a lock),
so several data-parallel ranks can share one server::

    GET  /health/              {"status": "ok", "model", "engine", "weights_version", "fingerprint",
                                "num_parameters", "num_values", "dtype", "device", "world_size"}
    GET  /get_world_size/      {"world_size"}
    GET  /parameters/          {"parameters": [[name, shape], ...]}  (names as the trainer sends them)
    POST /generate/            {"prompts": [[token ids]], SamplingParams' fields, "structured_outputs_regex",
                                "stop_token_ids" (the trainer's EOS ids, added to the model's own)}
                               -> {"completion_ids": [[ids]], "logprobs": [[float]], "weights_version"}
    POST /init_communicator/   {"group_port", "backend", "timeout"}
    POST /update_weights/      {"names", "dtypes", "shapes", "bucket_bytes"} -> {"weights_version"}
    POST /reset_prefix_cache/, POST /close_communicator/

A completion row holds the sampled tokens up to and including the first EOS (all of them when
there is none); ``logprobs`` the engine's log-prob of each, after its logit processors. Errors
answer ``{"error": message}``: 400 for a bad request, 500 for a failure.

Weight handshake: ``/init_communicator/`` opens a two-process group apart from any default
(DDP) group: the server hosts a ``TCPStore`` on ``group_port`` and joins as rank 1, the
trainer's global rank 0 joins as rank 0 (gloo; NCCL when both sides are on CUDA). Then, for each
update, the trainer posts the names, dtypes and shapes to ``/update_weights/`` and, while that
request is open, broadcasts the tensors: consecutive tensors of one dtype flattened into buckets
of at most ``bucket_bytes`` (:func:`plan_buckets`, the same plan on both sides), one broadcast per
bucket. The server loads each bucket, resets its prefix cache, bumps ``weights_version`` and
answers. Every wait has a timeout; a failed update closes the group, which fails the trainer's
pending broadcast instead of leaving it waiting.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import selectors
import shlex
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_align.ops.packing import left_pad
from lit_align.rollout.engines import (
    Generations,
    HFEngine,
    SamplingParams,
    VLLMEngine,
    _vllm_named_parameters,
    eos_ids,
)
from lit_align.rollout.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    WeightChannel,
    parameter_fingerprint,
    plan_buckets,
    torch_dtype,
)


class HFBackend:
    """The policy in this process, sampled by :class:`HFEngine`; weights copied in by name."""

    kind = "hf"
    world_size = 1

    def __init__(self, model: nn.Module, tokenizer: Any, seed: int) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.engine = HFEngine(tokenizer, seed=seed)
        self.params = dict(_vllm_named_parameters(model))
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(p.shape) for name, p in self.params.items()}

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams, regex: str | None,
                 stop: list[int] | None = None) -> Generations:
        if regex is not None:
            raise ValueError(
                "structured_outputs_regex (guided decoding) needs the vLLM engine, and this server runs the HF engine; "
                "start it with `lit-align serve --engine vllm` on a CUDA machine with vLLM installed"
            )
        config = self.model.generation_config
        saved = config.eos_token_id
        if stop:  # the trainer's EOS ids (its tokenizer may end completions with another token)
            config.eos_token_id = sorted(set(stop) | set(eos_ids(self.tokenizer, self.model)))
        try:
            return self.engine.generate(self.model, prompt_ids.to(self.device), prompt_mask.to(self.device), sampling)
        finally:
            config.eos_token_id = saved

    @torch.no_grad()
    def load(self, named: Iterable[tuple[str, Tensor]]) -> None:
        for name, tensor in named:
            self.params[name].copy_(tensor)

    def reset_prefix_cache(self) -> None:
        """No prefix cache across calls."""


class VLLMBackend:
    """A ``vllm.LLM`` (cannot run without CUDA; kept thin): TRL's sleep mode around weight loads
    (``--enable-sleep-mode``), ``--model-impl``, guided decoding by regex per request."""

    kind = "vllm"

    def __init__(self, args: argparse.Namespace, tokenizer: Any) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
        from vllm import LLM

        llm = LLM(
            model=args.model, revision=args.revision, tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_length, dtype=args.dtype,
            seed=args.seed, enable_sleep_mode=args.enable_sleep_mode, model_impl=args.model_impl,
            trust_remote_code=args.trust_remote_code, logprobs_mode="processed_logprobs",
        )
        self.llm, self.sleep_mode, self.world_size = llm, args.enable_sleep_mode, args.tensor_parallel_size
        self.engine = VLLMEngine(args.model, tokenizer, llm=llm)
        kwargs = {"revision": args.revision, "trust_remote_code": args.trust_remote_code}
        with torch.device("meta"):  # names and shapes as the trainer holds them, no memory
            self.model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(args.model, **kwargs), trust_remote_code=args.trust_remote_code
            )
        try:
            self.model.generation_config = GenerationConfig.from_pretrained(args.model, **kwargs)
        except OSError:
            pass
        self.dtype, self.device = llm.llm_engine.model_config.dtype, torch.device("cuda")

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(p.shape) for name, p in _vllm_named_parameters(self.model)}

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams, regex: str | None,
                 stop: list[int] | None = None) -> Generations:
        if stop:
            sampling = replace(sampling, generation_kwargs={**sampling.generation_kwargs, "stop_token_ids": list(stop)})
        if regex is not None:
            try:
                from vllm.sampling_params import StructuredOutputsParams

                guide = {"structured_outputs": StructuredOutputsParams(regex=regex)}
            except ImportError:  # vLLM before 0.10.2
                from vllm.sampling_params import GuidedDecodingParams

                guide = {"guided_decoding": GuidedDecodingParams(regex=regex)}
            sampling = replace(sampling, generation_kwargs={**sampling.generation_kwargs, **guide})
        if self.sleep_mode:
            self.llm.wake_up()
        try:
            return self.engine.generate(self.model, prompt_ids, prompt_mask, sampling)
        finally:
            if self.sleep_mode:
                self.llm.sleep(level=1)

    def load(self, named: Iterable[tuple[str, Tensor]]) -> None:
        if self.sleep_mode:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(_load_into_worker, args=(list(named),))

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


def _load_into_worker(worker: Any, named: list[tuple[str, Tensor]]) -> None:
    worker.model_runner.model.load_weights(weights=named)


def _left_pad(prompts: Any, pad_token_id: int) -> tuple[Tensor, Tensor]:
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, list) and p for p in prompts)):
        raise ValueError("'prompts' must be a non-empty list of non-empty lists of token ids")
    return left_pad(prompts, pad_token_id)


class GenerationServer:
    """The endpoints over a backend; ``routes`` maps ``(method, path)`` to handlers."""

    def __init__(self, backend: Any, model_name: str) -> None:
        self.backend, self.model_name = backend, model_name
        self.lock = threading.Lock()  # one generation or weight update at a time
        self.weights_version = 0
        self.channel: WeightChannel | None = None
        self.joined: threading.Thread | None = None
        self.join_error: BaseException | None = None
        self.identity = parameter_fingerprint(backend.shapes().items())
        self.routes: dict[tuple[str, str], Callable[[dict, str], dict]] = {
            ("GET", "/health/"): lambda body, host: self.health(),
            ("GET", "/get_world_size/"): lambda body, host: {"world_size": backend.world_size},
            ("GET", "/parameters/"): lambda body, host: {"parameters": sorted(backend.shapes().items())},
            ("POST", "/generate/"): lambda body, host: self.generate(body),
            ("POST", "/init_communicator/"): self.init_communicator,
            ("POST", "/update_weights/"): lambda body, host: self.update_weights(body),
            ("POST", "/reset_prefix_cache/"): lambda body, host: self.reset_prefix_cache(),
            ("POST", "/close_communicator/"): lambda body, host: self.close_communicator(),
        }

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok", "model": self.model_name, "engine": self.backend.kind, "weights_version": self.weights_version,
            **self.identity, "dtype": str(self.backend.dtype).removeprefix("torch."), "device": str(self.backend.device),
            "world_size": self.backend.world_size,
        }

    def generate(self, body: dict) -> dict[str, Any]:
        known = {f.name for f in fields(SamplingParams)}
        unknown = set(body) - known - {"prompts", "structured_outputs_regex", "stop_token_ids"}
        if unknown:
            raise ValueError(f"unknown generation settings {sorted(unknown)}; known: {sorted(known)}")
        sampling = SamplingParams(**{k: v for k, v in body.items() if k in known})
        ids, mask = _left_pad(body.get("prompts"), self.backend.engine.pad_token_id)
        with self.lock:
            gens = self.backend.generate(ids, mask, sampling, body.get("structured_outputs_regex"), body.get("stop_token_ids"))
            version = self.weights_version
        lengths = gens.completion_mask.sum(1).tolist()
        rows = [row[:n] for row, n in zip(gens.completion_ids.tolist(), lengths)]
        logps = None if gens.sampling_logps is None else [r[:n] for r, n in zip(gens.sampling_logps.tolist(), lengths)]
        return {"completion_ids": rows, "logprobs": logps, "weights_version": version}

    def init_communicator(self, body: dict, server_host: str) -> dict[str, Any]:
        """Listens on ``group_port`` now and joins the group in a thread: the caller joins after this answers."""
        backend, port, timeout = body.get("backend", "gloo"), int(body["group_port"]), float(body.get("timeout", 600.0))
        if backend == "nccl" and self.backend.device.type != "cuda":
            raise ValueError(f"backend 'nccl' needs the server on CUDA; this one runs on {self.backend.device}")
        with self.lock:
            self._close_channel()
            self.channel = channel = WeightChannel(server_host, port, 1, backend, timeout)

            def join() -> None:
                try:
                    channel.join(server_host)
                except BaseException as err:  # reported by the next update
                    self.join_error = err

            self.join_error, self.joined = None, threading.Thread(target=join, daemon=True)
            self.joined.start()
        return {"status": "ok", "group_port": port, "backend": backend}

    def update_weights(self, body: dict) -> dict[str, Any]:
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        with self.lock:
            try:
                self._receive(names, dtypes, shapes, int(body.get("bucket_bytes", DEFAULT_BUCKET_BYTES)))
            except BaseException:
                self._close_channel()  # fails the trainer's pending broadcast now
                raise
            self.backend.reset_prefix_cache()
            self.weights_version += 1
            return {"weights_version": self.weights_version}

    def _receive(self, names: list[str], dtypes: list[str], shapes: list[list[int]], bucket_bytes: int) -> None:
        if self.channel is None or self.joined is None:
            raise ValueError("no weight-sync group: POST /init_communicator/ first")
        self.joined.join(self.channel.timeout.total_seconds())
        if self.join_error is not None or self.channel.group is None:
            raise RuntimeError(f"the trainer did not join the weight-sync group: {self.join_error or 'timed out'}")
        expected = self.backend.shapes()
        wrong = [f"{n} {list(s)} (expected {expected.get(n, 'no such parameter')})" for n, s in zip(names, shapes)
                 if expected.get(n) != list(s)]
        if wrong:
            raise ValueError(f"{len(wrong)} tensors do not fit {self.model_name}: {', '.join(wrong[:3])}")
        for dtype, indices in plan_buckets(dtypes, shapes, bucket_bytes):
            sizes = [math.prod(shapes[i]) for i in indices]
            flat = torch.empty(sum(sizes), dtype=torch_dtype(dtype), device=self.channel.device)
            self.channel.broadcast(flat)
            parts = flat.split(sizes)
            self.backend.load((names[i], part.view(shapes[i])) for i, part in zip(indices, parts))

    def reset_prefix_cache(self) -> dict[str, Any]:
        with self.lock:
            self.backend.reset_prefix_cache()
        return {"status": "ok"}

    def close_communicator(self) -> dict[str, Any]:
        with self.lock:
            self._close_channel()
        return {"status": "ok"}

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.channel = self.joined = None


def make_http_server(server: GenerationServer, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server (a thread per request; the generation server serialises the work) over ``server``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def _route(self, method: str) -> None:
            path = "/" + self.path.split("?")[0].strip("/") + "/"
            handler = server.routes.get((method, path))
            try:
                if handler is None:
                    endpoints = ", ".join(f"{m} {p}" for m, p in server.routes)
                    self._reply(404, {"error": f"no endpoint {method} {path}; endpoints: {endpoints}"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if method == "POST" else {}
                if not isinstance(body, dict):
                    raise ValueError("the request body must be a JSON object")
                self._reply(200, handler(body, self.connection.getsockname()[0]))
            except (ValueError, KeyError, TypeError) as err:
                self._reply(400, {"error": f"missing field {err}" if isinstance(err, KeyError) else str(err)})
            except Exception as err:
                traceback.print_exc()
                self._reply(500, {"error": f"{type(err).__name__}: {err}"})

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: errors are printed where they happen."""

    http = ThreadingHTTPServer((host, port), Handler)
    http.daemon_threads = True
    return http


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-align serve", description=(
        "A generation server for lit-align trainers (TRL's vllm-serve): the trainer samples it with "
        "lit_align.rollout.server_engine.ServerEngine and pushes its weights into it after each optimizer step."))
    p.add_argument("--model", required=True, help="builtin:tiny, a local model directory or a Hub id")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed when ready)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--engine", choices=["auto", "hf", "vllm"], default="auto",
                   help="auto: vLLM when it is installed and CUDA is available, else HF")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM only")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    p.add_argument("--max-model-length", type=int, default=None, help="vLLM only (max_model_len)")
    p.add_argument("--enable-sleep-mode", action="store_true", help="vLLM only: sleep between requests, wake to load weights")
    p.add_argument("--model-impl", default="vllm", help="vLLM only: vllm or transformers")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--revision", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def make_backend(args: argparse.Namespace) -> Any:
    from lit_align.models.builtin import is_builtin
    from lit_align.models.loading import load_causal_lm, load_tokenizer

    vllm_ready = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if args.engine == "vllm" and not vllm_ready:
        raise ValueError("--engine vllm needs vLLM installed and a CUDA GPU (pip install vllm); or use --engine hf")
    if args.engine == "vllm" and is_builtin(args.model):
        raise ValueError(f"vLLM loads models from a directory or the Hub, not {args.model}; use --engine hf")
    kwargs = {k: v for k, v in {"revision": args.revision, "trust_remote_code": args.trust_remote_code or None}.items() if v}
    tokenizer = load_tokenizer(args.model, **kwargs)
    if args.engine == "vllm" or (args.engine == "auto" and vllm_ready and not is_builtin(args.model)):
        return VLLMBackend(args, tokenizer)
    torch.manual_seed(args.seed)
    model = load_causal_lm(args.model, dtype=args.dtype, **kwargs)
    return HFBackend(model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer, args.seed)


def serve_main(argv: Sequence[str] | None = None) -> None:
    """``lit-align serve``: load the model, print one line when ready, serve until interrupted."""
    args = build_parser().parse_args(argv)
    try:
        server = GenerationServer(make_backend(args), args.model)
        http = make_http_server(server, args.host, args.port)
    except (ValueError, FileNotFoundError, ImportError, OSError) as err:
        sys.stderr.write(f"error: lit-align serve: {err}\n")
        sys.exit(2)
    print(f"lit-align serve: {args.model} on http://{args.host}:{http.server_address[1]} (engine {server.backend.kind})",
          flush=True)
    try:
        http.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        http.server_close()
        server.close_communicator()


def launch(argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None,
           timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Start ``lit-align serve ARGV`` as a child process; return it and its URL once it printed its
    ready line (``--port 0`` picks a free port). Raises with the server's own error if it stops first."""
    process = subprocess.Popen([sys.executable, "-m", "lit_align.cli", "serve", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    ready = selectors.DefaultSelector()
    ready.register(process.stdout, selectors.EVENT_READ)
    line = process.stdout.readline() if ready.select(timeout) else ""
    if " on http://" not in line:
        process.kill()
        _, err = process.communicate(timeout=30)
        raise RuntimeError(f"lit-align serve {' '.join(argv)} did not start within {timeout:g}s: {line.strip()!r} {err[-2000:]}")
    return process, line.split(" on ")[1].split()[0]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for a server's ``--port`` or a ``vllm_group_port``)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def config_server_argv(config: str | os.PathLike) -> list[str] | None:
    """The ``lit-align serve`` arguments a config's header asks for (a ``# serve: lit-align serve ...``
    line: the server to start before ``lit-align fit --config`` it), or None."""
    for line in Path(config).read_text().splitlines():
        head, _, command = line.partition("# serve:")
        if not head.strip() and command.strip():
            words = shlex.split(command)
            if words[:2] != ["lit-align", "serve"]:
                raise ValueError(f"{config}: '# serve:' must be followed by a `lit-align serve ...` command, got {command!r}")
            return words[2:]
    return None


if __name__ == "__main__":
    serve_main()
