"""The trainer's side of ``lit-align serve``: :class:`ServerEngine`, a generation engine that samples
a server's copy of the policy and pushes the policy's weights into it.

TRL's ``vllm_mode="server"`` settings map onto its arguments: ``vllm_server_base_url`` ->
``base_url``, ``vllm_server_host`` -> ``host``, ``vllm_server_port`` -> ``port``,
``vllm_server_timeout`` -> ``connection_timeout``, ``vllm_group_port`` -> ``group_port``,
``vllm_structured_outputs_regex`` -> ``structured_outputs_regex``. The endpoints and the weight
handshake are described in :mod:`lit_align.rollout.server`.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from lit_align.rollout.engines import (
    Generations,
    SamplingParams,
    TokenizerEngine,
    _vllm_named_parameters,
    completion_mask,
    eos_ids,
    right_pad,
)
from lit_align.rollout.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    WeightChannel,
    parameter_fingerprint,
    plan_buckets,
    torch_dtype,
)

SHORT_TIMEOUT = 30.0  # health, parameters, close: answered without the lock


def _global_rank() -> int:
    from torch import distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _local_address(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (where the server reaches this process)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))  # UDP: picks the route, sends nothing
        return probe.getsockname()[0]


class ServerEngine(TokenizerEngine):
    """Sampling from a ``lit-align serve`` process (TRL's ``vllm_mode="server"``).

    Args:
        base_url: The server's URL (``http://10.0.0.2:8000``); else ``http://{host}:{port}``.
        host: The server's host, when ``base_url`` is not given.
        port: The server's HTTP port, when ``base_url`` is not given.
        group_port: The port the server listens on for the weight-sync group.
        connection_timeout: Seconds to wait for the server to answer on first use.
        tokenizer: The policy's tokenizer (else the module connects its own).
        request_timeout: Seconds one generation request may take.
        sync_timeout: Seconds a weight-sync step (joining the group, a broadcast) may take.
        structured_outputs_regex: Guided decoding by regex (vLLM servers only).
        bucket_bytes: Largest buffer one broadcast sends (tensors of one dtype are flattened into it).
    """

    samples_any_model = False  # the server's copy of the policy, refreshed by sync_weights

    def __init__(
        self,
        base_url: str | None = None,
        host: str = "0.0.0.0",
        port: int = 8000,
        group_port: int = 51216,
        connection_timeout: float = 240.0,
        tokenizer: Any = None,
        request_timeout: float = 600.0,
        sync_timeout: float = 600.0,
        structured_outputs_regex: str | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        self.base_url = base_url.rstrip("/") if base_url else f"http://{host}:{port}"
        parsed = urlparse(self.base_url)
        self.host, self.port = parsed.hostname or host, parsed.port or port
        self.group_port, self.connection_timeout = group_port, connection_timeout
        self.request_timeout, self.sync_timeout, self.bucket_bytes = request_timeout, sync_timeout, bucket_bytes
        self.structured_outputs_regex = structured_outputs_regex
        self.tokenizer = tokenizer
        self.info: dict[str, Any] | None = None  # the server's /health/ answer
        self._checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._channel: WeightChannel | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (a spawned process reconnects): no live group, no model references."""
        return {**self.__dict__, "info": None, "_checked": None, "_channel": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _checked=weakref.WeakSet())

    # --- HTTP -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = SHORT_TIMEOUT) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read()).get("error", "")
            except ValueError:
                message = err.reason
            kind = ValueError if err.code in (400, 404) else RuntimeError
            raise kind(f"the generation server at {self.base_url} refused {method} {path}: {message}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, timed out
            reason = getattr(err, "reason", None) or err
            raise RuntimeError(f"the generation server at {self.base_url} stopped answering: {reason}") from err

    def _ready(self, model: nn.Module) -> dict[str, Any]:
        """Wait for the server on first use (at most ``connection_timeout``), then check ``model`` is its model."""
        if self.info is None:
            deadline = time.monotonic() + self.connection_timeout
            while True:
                try:
                    self.info = self._request("GET", "/health/", timeout=max(1.0, min(5.0, self.connection_timeout)))
                    break
                except RuntimeError as err:
                    if time.monotonic() >= deadline:
                        name = getattr(getattr(model, "config", None), "name_or_path", None) or "MODEL"
                        raise ConnectionError(
                            f"no generation server answered at {self.base_url} within {self.connection_timeout:g}s; "
                            f"start one with `lit-align serve --model {name} --port {self.port}` ({err})"
                        ) from None
                    time.sleep(0.5)
        if model not in self._checked:
            self._check_model(model)
            self._checked.add(model)
        return self.info

    def _check_model(self, model: nn.Module) -> None:
        info = self.info
        mine = {name: list(p.shape) for name, p in _vllm_named_parameters(model)}
        ours = parameter_fingerprint(mine.items())
        if ours["fingerprint"] == info["fingerprint"]:
            return
        theirs = dict(self._request("GET", "/parameters/")["parameters"])
        differ = [f"{n} is {theirs[n]} on the server and {s} in the policy" for n, s in mine.items() if n in theirs and theirs[n] != s]
        differ += [f"{n} only on the server" for n in theirs if n not in mine][:2]
        differ += [f"{n} only in the policy" for n in mine if n not in theirs][:2]
        raise ValueError(
            f"the server at {self.base_url} serves {info['model']} with {info['num_parameters']} parameters "
            f"({info['num_values']:,} values), the trainer's policy has {ours['num_parameters']} "
            f"({ours['num_values']:,} values): {'; '.join(differ[:4])}. Serve the policy's model "
            "(`lit-align serve --model <the module's model_name_or_path>`)"
        )

    # --- the engine protocol ----------------------------------------------------------------

    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams) -> Generations:
        """``prompts x num_generations`` rows from the server, as every engine returns them."""
        self._ready(model)
        n, device = sampling.num_generations, prompt_ids.device
        prompts = [[t for t, m in zip(p, pm) if m] for p, pm in zip(prompt_ids.tolist(), prompt_mask.tolist())]
        eos = eos_ids(self.tokenizer, model)
        body = {"prompts": prompts, **{f.name: getattr(sampling, f.name) for f in fields(sampling)}, "stop_token_ids": eos}
        if self.structured_outputs_regex is not None:
            body["structured_outputs_regex"] = self.structured_outputs_regex
        try:
            json.dumps(sampling.generation_kwargs)
        except TypeError as err:
            raise ValueError(f"generation_kwargs travel to the server as JSON, and these do not: {err}") from None
        reply = self._request("POST", "/generate/", body, timeout=self.request_timeout)
        rows = reply["completion_ids"]
        if len(rows) != len(prompts) * n:
            raise RuntimeError(f"the generation server at {self.base_url} returned {len(rows)} completions for {len(prompts)} prompts x {n}")
        ids = right_pad(rows, self.pad_token_id)
        logps = None
        if reply.get("logprobs") is not None:
            logps = torch.zeros(ids.shape, dtype=torch.float32)
            for i, row in enumerate(reply["logprobs"]):
                logps[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        cmask, truncated = completion_mask(ids, eos)
        ids = ids.masked_fill(cmask == 0, self.pad_token_id)
        logps = None if logps is None else logps.masked_fill(cmask == 0, 0.0).to(device)
        return Generations(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), ids.to(device),
                           cmask.to(device), truncated.to(device), logps)

    @torch.no_grad()
    def sync_weights(self, model: nn.Module) -> None:
        """Push the policy's weights (LoRA merged in) from global rank 0; every rank then waits at a
        barrier, so none samples stale weights. Every rank calls it: an FSDP2-sharded policy is gathered
        whole first (a collective; free inside a rollout, which has gathered it already)."""
        from torch import distributed as dist

        from lit_align.models.reference import is_peft_model
        from lit_align.ops.sharding import full_parameters

        self._ready(model)
        with full_parameters(model):
            if _global_rank() == 0:
                merged = is_peft_model(model)
                if merged:
                    model.merge_adapter()
                try:
                    self._push([(name, p.detach()) for name, p in _vllm_named_parameters(model)])
                finally:
                    if merged:
                        model.unmerge_adapter()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        """Close the weight-sync group (the server forgets it too, if it still answers)."""
        if self._channel is None:
            return
        self._drop_channel()
        try:
            self._request("POST", "/close_communicator/", {}, timeout=5.0)
        except (RuntimeError, ValueError):
            pass

    # --- the weight handshake ---------------------------------------------------------------

    def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _open_channel(self, policy_device: torch.device) -> WeightChannel:
        from torch import distributed as dist

        if self._channel is not None:
            return self._channel
        on_cuda = policy_device.type == "cuda" and self.info["device"].startswith("cuda")
        backend = "nccl" if on_cuda and dist.is_nccl_available() else "gloo"
        self._request("POST", "/init_communicator/", {
            "group_port": self.group_port, "backend": backend, "timeout": self.sync_timeout,
        }, timeout=SHORT_TIMEOUT)
        try:
            channel = WeightChannel(self.host, self.group_port, 0, backend, self.sync_timeout)
            channel.join(_local_address(self.host, self.group_port))
        except Exception as err:
            raise RuntimeError(
                f"could not join the weight-sync group of the generation server at {self.base_url} "
                f"(port {self.group_port}, {backend}): {err}"
            ) from err
        self._channel = channel
        return channel

    def _push(self, named: list[tuple[str, Tensor]]) -> None:
        """Announce the tensors, then broadcast them bucket by bucket while the server receives."""
        channel = self._open_channel(named[0][1].device)
        target = torch_dtype(self.info["dtype"])
        dtypes = [target if t.is_floating_point() else t.dtype for _, t in named]
        meta = {"names": [n for n, _ in named], "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
                "shapes": [list(t.shape) for _, t in named], "bucket_bytes": self.bucket_bytes}
        with ThreadPoolExecutor(max_workers=1) as pool:
            reply = pool.submit(self._request, "POST", "/update_weights/", meta, self.sync_timeout + SHORT_TIMEOUT)
            try:
                for _, indices in plan_buckets(meta["dtypes"], meta["shapes"], self.bucket_bytes):
                    channel.broadcast(torch.cat([named[i][1].reshape(-1).to(channel.device, dtypes[i]) for i in indices]))
            except Exception as err:
                self._drop_channel()  # the server closed its side, or died: a new group next time
                try:
                    reply.result(timeout=SHORT_TIMEOUT)
                except Exception as server_err:  # the server's own account, when it gave one
                    raise server_err from err
                raise RuntimeError(f"the generation server at {self.base_url} stopped answering during a weight sync: {err}") from err
            try:
                result = reply.result()
            except Exception:
                self._drop_channel()
                raise
        self.info["weights_version"] = result["weights_version"]
